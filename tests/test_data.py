import json

import numpy as np
import torch
import pytest

from moeforge.data import BatchSampler, ByteTokenizer, HFTokenizer, load_corpus
from moeforge.errors import DataError


def test_default_corpus_is_the_standard_library_and_split_is_deterministic():
    tok = ByteTokenizer()
    a = load_corpus(None, tok, max_mb=1.0)
    b = load_corpus(None, tok, max_mb=1.0)
    assert "standard library" in a.source
    assert len(a.train) > 500_000 and len(a.val) > 5_000
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.train.max() < 256 and (a.train == tok.eos_id).sum() > 1  # documents separated


def test_text_folder_jsonl_and_token_files(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "a.txt").write_text("hello world " * 100)
    (tmp_path / "b.md").write_text("second document " * 100)
    corpus = load_corpus(str(tmp_path), tok)
    assert len(corpus.train) + len(corpus.val) == 1200 + 1600 + 2
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(50)))
    assert len(load_corpus(str(jl), tok).train) > 0
    ids = np.arange(1000, dtype=np.uint16) % 300
    ids.tofile(tmp_path / "t.bin")
    np.save(tmp_path / "t.npy", ids.astype(np.int64))
    for name in ("t.bin", "t.npy"):
        c = load_corpus(str(tmp_path / name), tok, val_fraction=0.1)
        assert np.array_equal(np.concatenate([c.train, c.val]), ids)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "not found"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no text files"),
    (lambda p: (p / "e.txt").write_text("  \n") and p / "e.txt", "no text found"),
    (lambda p: (p / "x.jsonl").write_text('{"txt": 1}\n') and p / "x.jsonl", "x.jsonl:1"),
    (lambda p: (p / "z.npy").write_bytes(b"garbage") and p / "z.npy", "cannot read token file"),
])
def test_bad_data_paths_give_clear_errors(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_corpus(str(make(tmp_path)), ByteTokenizer())


def test_batches_are_a_pure_function_of_step():
    tokens = np.arange(10_000, dtype=np.int32)
    s = BatchSampler(tokens, seq_len=16, batch_size=4, seed=7)
    x1, y1 = s.batch(3)
    x2, y2 = BatchSampler(tokens, 16, 4, seed=7).batch(3)
    assert x1.equal(x2) and y1.equal(y2)
    assert (y1 == x1 + 1).all()  # labels are the next token
    assert not s.batch(4)[0].equal(x1)
    with pytest.raises(DataError, match="fewer than seq_len"):
        BatchSampler(tokens[:10], 16, 4, seed=0)


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    t = HFTokenizer(tmp_path)
    assert t.vocab_size == 4 and t.eos_id == 1
    assert t.encode("hello world") == [2, 3]
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        HFTokenizer(tmp_path / "bad.json")


def _token_count(corpus) -> int:
    return len(corpus.train) + len(corpus.val)


def test_max_corpus_mb_caps_single_files_jsonl_and_folders(tmp_path):
    """At most max_mb x 1e6 bytes of text, from any source (main applied it only between a folder's files):
    ByteTokenizer gives one token per byte plus one end-of-document token per document."""
    tok = ByteTokenizer()
    single = tmp_path / "big.txt"
    single.write_text("abcdefghij" * 300)  # 3000 bytes, one document
    assert _token_count(load_corpus(str(single), tok, max_mb=0.001)) == 1000 + 1
    jl = tmp_path / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"text": "x" * 150}) for _ in range(50)))  # 7500 bytes of text
    assert _token_count(load_corpus(str(jl), tok, max_mb=0.001)) == 1000 + 7  # 6 whole documents, a 7th cut
    accents = tmp_path / "accents.txt"
    accents.write_text("é" * 1000)  # 2000 bytes: a 999-byte budget keeps 499 whole characters
    corpus = load_corpus(str(accents), tok, max_mb=0.000999)
    assert _token_count(corpus) == 998 + 1 and tok.decode(np.concatenate([corpus.train, corpus.val])) == "é" * 499
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("a" * 1200)
    (folder / "b.txt").write_text("b" * 1600)
    assert _token_count(load_corpus(str(folder), tok, max_mb=0.002)) == 2000 + 2


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_token_files_stay_memory_mapped(tmp_path, suffix):
    """A 4M-token file: the splits are views of the mapped file and a batch reads only its windows, so the
    Python heap (numpy reports its buffers to tracemalloc) stays far below even one int32 copy (16 MB)."""
    import tracemalloc

    ids = (np.arange(4_000_000, dtype=np.uint32) * 7919 % 50_000).astype(np.uint16)
    path = tmp_path / f"tokens{suffix}"
    np.save(path, ids) if suffix == ".npy" else ids.tofile(path)
    tracemalloc.start()
    try:
        corpus = load_corpus(str(path), ByteTokenizer(), val_fraction=0.01)
        sampler = BatchSampler(corpus.train, seq_len=64, batch_size=8, seed=3)
        batches = [sampler.batch(i) for i in range(3)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(corpus.train, np.memmap) and isinstance(sampler.tokens, np.memmap)
    assert peak < 1_000_000, f"{peak} bytes allocated while loading and sampling a {ids.nbytes}-byte token file"
    train = torch.from_numpy(ids[:len(corpus.train)].astype(np.int64))
    for i, (x, y) in enumerate(batches):  # the same windows as main's in-memory sampler drew (resumes agree)
        g = torch.Generator().manual_seed(3 * 1_000_003 + i)
        starts = torch.randint(0, len(train) - 65, (8,), generator=g)
        windows = train[starts[:, None] + torch.arange(65)]
        assert x.dtype == torch.int64 and x.equal(windows[:, :-1]) and y.equal(windows[:, 1:])
