"""Parquet files, folders of them, and `datasets.Dataset.save_to_disk` folders (Arrow) as documents.

Files are read record batch by record batch with pyarrow and reading stops once the corpus budget
(max_corpus_mb) is filled, so memory is bounded by that budget plus about one parquet page or Arrow batch,
not by the size of the files. A document is one row's text column; its name (file:row) decides its
train/validation side, as for every other source.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import DataError

BATCH_ROWS = 512
READ_BUFFER = 1 << 16  # parquet: read column chunks through a 64 KiB buffer instead of whole into memory


def arrow_files(path: Path) -> list[Path] | None:
    """The parquet/Arrow files `path` stands for, or None when it is not a parquet/Arrow source."""
    if path.is_file():
        return [path] if path.suffix.lower() in (".parquet", ".arrow") else None
    if not path.is_dir():
        return None
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise DataError(f"{path}: a DatasetDict folder with splits {', '.join(splits) or '(none)'}; pass one "
                        f"split's folder, e.g. {path / (splits[0] if splits else 'train')}")
    state = path / "state.json"
    if state.is_file():  # Dataset.save_to_disk: state.json lists the Arrow files in order
        try:
            names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{state}: not a datasets save_to_disk state file ({type(e).__name__}: {e})") from None
        files = [path / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{state}: lists {', '.join(missing)}, missing from the folder")
        return files
    files = sorted(path.rglob("*.parquet")) or sorted(path.glob("*.arrow"))
    return files or None


def arrow_documents(root: Path, files: list[Path], text_field: str, max_bytes: int) -> Iterator[tuple[str, str]]:
    """(name, text) for each row of `files` in order, until max_bytes characters have been read."""
    total = 0
    for f in files:
        label = str(f.relative_to(root)) if f != root else f.name
        row = 0
        for column in _text_batches(f, text_field):
            for text in column.to_pylist():
                row += 1
                if text is None:
                    continue
                yield f"{label}:{row - 1}", text
                total += len(text)
                if total >= max_bytes:
                    return


def _text_batches(f: Path, field: str):
    """The `field` column of `f`, one record batch at a time (parquet, Arrow IPC stream or file)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(f"{f}: reading parquet/Arrow needs pyarrow: pip install 'moeforge[data]'") from None

    try:
        if f.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            reader = pq.ParquetFile(f, buffer_size=READ_BUFFER, pre_buffer=False)
            _check_column(f, reader.schema_arrow, field)
            batches = reader.iter_batches(batch_size=BATCH_ROWS, columns=[field])
        else:
            source = pa.memory_map(str(f))
            try:  # datasets writes the streaming format; Feather v2 / pa.ipc.new_file writes the file format
                reader = pa.ipc.open_stream(source)
                batches = iter(reader)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            _check_column(f, reader.schema, field)
        for batch in batches:
            yield batch.column(field)
    except DataError:
        raise
    except (pa.ArrowException, OSError) as e:
        kind = "parquet" if f.suffix.lower() == ".parquet" else "Arrow"
        raise DataError(f"{f}: not a readable {kind} file ({str(e).splitlines()[0]})") from None


def _check_column(f: Path, schema, field: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        raise DataError(f"{f}: no column {field!r} (columns: {', '.join(schema.names)}); choose one with "
                        "--text-field")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{f}: column {field!r} holds {kind}, not text; choose another with --text-field")
