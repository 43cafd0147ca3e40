"""--data with parquet files, folders of them and `datasets` save_to_disk folders (Arrow): the documents, the
deterministic split, the memory bound on a file larger than max_corpus_mb, and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from moeforge.data import ByteTokenizer, is_validation, load_corpus
from moeforge.errors import DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TEXTS = [f"document {i}: " + "moe router expert token " * (i % 7 + 1) for i in range(60)]


def expected_split(named_texts, val_fraction=0.05):
    """(train, val) token streams built from (name, text) pairs by hand: bytes + the EOS byte 0."""
    parts = {True: [], False: []}
    for name, text in named_texts:
        parts[is_validation(name, val_fraction)].append(list(text.encode()) + [0])
    return [np.array(sum(parts[side], []), dtype=np.int32) for side in (False, True)]


def test_parquet_file_and_folder_read_the_text_column_with_a_deterministic_split(tmp_path):
    pq.write_table(pa.table({"id": list(range(40)), "body": TEXTS[:40]}), tmp_path / "a.parquet", row_group_size=7)
    corpus = load_corpus(str(tmp_path / "a.parquet"), ByteTokenizer(), text_field="body")
    train, val = expected_split((f"a.parquet:{i}", t) for i, t in enumerate(TEXTS[:40]))
    assert len(val) and np.array_equal(corpus.train, train) and np.array_equal(corpus.val, val)

    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.table({"text": TEXTS[:30]}), folder / "part-0.parquet")
    pq.write_table(pa.table({"text": TEXTS[30:]}), folder / "part-1.parquet")
    corpus = load_corpus(str(folder), ByteTokenizer())
    named = [(f"part-0.parquet:{i}", t) for i, t in enumerate(TEXTS[:30])]
    named += [(f"part-1.parquet:{i}", t) for i, t in enumerate(TEXTS[30:])]
    train, val = expected_split(named)
    assert np.array_equal(corpus.train, train) and np.array_equal(corpus.val, val)


def test_datasets_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))})
    dataset.save_to_disk(str(tmp_path / "ds"), num_shards=2)
    files = json.loads((tmp_path / "ds" / "state.json").read_text())["_data_files"]
    assert len(files) == 2
    corpus = load_corpus(str(tmp_path / "ds"), ByteTokenizer())
    split = len(dataset.shard(num_shards=2, index=0, contiguous=True))  # save_to_disk's contiguous shards
    named = [(f"{files[0]['filename']}:{i}", t) for i, t in enumerate(TEXTS[:split])]
    named += [(f"{files[1]['filename']}:{i}", t) for i, t in enumerate(TEXTS[split:])]
    train, val = expected_split(named)
    assert np.array_equal(corpus.train, train) and np.array_equal(corpus.val, val)

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS[:5]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict folder with splits train; pass one split's folder"):
        load_corpus(str(tmp_path / "dd"), ByteTokenizer())


MEASURE = """
import json, sys
import pyarrow as pa
from moeforge.data import ByteTokenizer, load_corpus
corpus = load_corpus(sys.argv[1], ByteTokenizer(), max_mb=0.25)
print(json.dumps({"tokens": len(corpus.train) + len(corpus.val), "peak": pa.default_memory_pool().max_memory()}))
"""


def test_a_parquet_file_larger_than_max_corpus_mb_is_streamed_not_loaded(tmp_path):
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "moe", "expert", "router", "token", "layer"])
    base = " ".join(rng.choice(words, size=20000))
    starts, lengths = rng.integers(0, 60000, size=8000), rng.integers(300, 2400, size=8000)
    texts = [base[s:s + n] for s, n in zip(starts, lengths)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": texts}), path)  # one row group: the reader must still not load it whole
    text_bytes = sum(len(t) for t in texts)
    assert text_bytes > 1e7 and pq.ParquetFile(path).num_row_groups == 1
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout)
    read, expected = 0, 0  # documents are taken whole until 0.25 MB of text has been read
    for t in texts:
        read, expected = read + len(t), expected + len(t) + 1  # + the EOS token
        if read >= 0.25e6:
            break
    assert measured["tokens"] == expected
    # pyarrow's peak allocation is a few pages (measured ~3.7 MB for this file and for one 3x its size)
    assert measured["peak"] < text_bytes / 2, measured


def test_bad_parquet_and_arrow_input_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable parquet file") as e:
        load_corpus(str(tmp_path / "junk.parquet"), ByteTokenizer())
    assert "\n" not in str(e.value)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(DataError, match=r"other\.parquet: no column 'text' \(columns: body\); choose one with "
                                        r"--text-field"):
        load_corpus(str(tmp_path / "other.parquet"), ByteTokenizer())
    pq.write_table(pa.table({"n": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"column 'n' holds int64, not text"):
        load_corpus(str(tmp_path / "ints.parquet"), ByteTokenizer(), text_field="n")
    (tmp_path / "junk.arrow").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=r"junk\.arrow: not a readable Arrow file"):
        load_corpus(str(tmp_path / "junk.arrow"), ByteTokenizer())
