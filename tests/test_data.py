import json

import numpy as np
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
