"""Turn a data source into raw rows (dicts), whatever it is: streamed in batches or as one list.

Accepted sources: a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, the same gzipped
(``.jsonl.gz``, ``.json.gz``, ``.csv.gz``), a folder of such shards (read in sorted order), an
in-memory ``datasets.Dataset`` / ``pandas.DataFrame`` / list of dicts, ``builtin:answer-format``
(``@eval`` for its eval split) and otherwise a hub dataset id (``owner/name``, ``owner/name@split``).

A JSON line that does not parse does not stop loading: it becomes a row ``{"__error__": ...,
"__raw__": line}`` that validation rejects with code BAD_JSON.

:func:`iter_batches` streams: JSON lines are read line by line (gzip decompressed on the fly),
Parquet a few rows at a time by what its pages hold (:mod:`data_contracts.parquet_reader`), CSV
record by record, a hub dataset (memory-mapped Arrow) with ``Dataset.iter``; only one batch of
Python rows exists at a time. A ``.json`` file holding one JSON array (or ``{"data": [...]}``) is
streamed element by element (:mod:`data_contracts.readers`). Memory stays bounded on hostile files:
a line, element, CSV record or Parquet cell over MAX_LINE_BYTES (decompressed) is a ROW_TOO_LARGE
row, JSON nested too deep a TOO_DEEP one; a file's batches are :class:`readers.Rows` with each
row's size. :func:`load_rows` collects everything (small data only).

Which source a scheduled run reads: :func:`resolve_source` fills in ``{date}`` and can take a
folder's newest partition; :func:`source_fingerprint` is its content hash (the run's data identity).
"""

from __future__ import annotations

import datetime as dt
import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any, Iterator

from data_contracts import builtin, parquet_reader, readers
from data_contracts.config import BUILTIN_DATASET
from data_contracts.errors import DataError
from data_contracts.helpers import file_sha256, fingerprint

BUILTIN_PREFIX = "builtin:"
EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")
BATCH_ROWS = 4096


def describe(source: Any) -> str:
    """A short printable name of a source for reports and messages."""
    if isinstance(source, (str, Path)):
        return str(source)
    n = len(source) if hasattr(source, "__len__") else "?"
    return f"<in-memory {type(source).__name__} of {n} rows>"


def _ext(path: Path) -> str | None:
    name = path.name.lower()
    return next((e for e in sorted(EXTENSIONS, key=len, reverse=True) if name.endswith(e)), None)


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _bad_line(n: int, line: bytes, e: Exception) -> dict:
    why = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
    return readers.marker("BAD_JSON", f"line {n}: invalid JSON ({why})",
                          line[:readers.RAW_KEPT * 4].decode("utf-8", "replace").rstrip("\r\n"))


def decode_line(n: int, line: bytes | int) -> Any:
    """The row of JSON line number ``n`` (a BAD_JSON marker row when it does not parse, a
    ROW_TOO_LARGE one for a line given as its size)."""
    return _decode_owned(n, [line])


def decode_lines(lines: list) -> None:
    """Decode a batch of ``(line number, line)`` pairs in place, as :func:`decode_line` does, each
    line let go as soon as it is decoded to text (a huge line is then held as its text and its
    value, not also as bytes); the caller must hold no other reference to the lines."""
    for k in range(len(lines)):
        n, line = lines[k]
        lines[k] = None
        box, line = [line], None
        lines[k] = _decode_owned(n, box)


def _decode_owned(n: int, box: list) -> Any:
    line = box.pop()
    if isinstance(line, int):
        return _too_large(n, line)
    size, kept = len(line), readers.RAW_KEPT * 4
    head = line if size <= kept else line[:kept]  # all a BAD_JSON marker keeps of it
    try:  # what json.loads(bytes) does, the bytes let go before parsing
        text = line.decode(json.detect_encoding(line), "surrogatepass")
        line = None
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        return _bad_line(n, head, e)
    except RecursionError:
        return readers.marker("TOO_DEEP", f"line {n}: JSON nested too deep to parse ({size:,} "
                                          "bytes); flatten it")
    except MemoryError:
        return _too_large(n, size)


MAX_LINE_BYTES = 64 * 2**20  # a longer JSON line is not read into memory: it is a ROW_TOO_LARGE reject


LONG_LINE = 2**20  # bytes: a longer line of a plain file is measured first, then read in one piece


def _lines(f, limit: int) -> Iterator[bytes | int]:
    """The lines of ``f``; a line longer than ``limit`` bytes is skipped in chunks (memory stays
    bounded) and given as its length instead. In a plain file a line over LONG_LINE bytes is
    measured, then read in one piece (``readline`` would hold it twice while joining its chunks)."""
    plain = isinstance(f, io.BufferedReader)
    first = min(limit, LONG_LINE) if plain else limit
    while True:
        line = f.readline(first + 1)
        if not line:
            return
        if len(line) <= first or line.endswith(b"\n"):
            box, line = [line], None  # not kept here while the caller holds it
            yield box.pop()
            continue
        start, size = f.tell() - len(line) if plain else 0, len(line)
        while not line.endswith(b"\n"):
            line = f.readline(2**20)
            if not line:
                break
            size += len(line)
        if plain and (size <= limit or (size == limit + 1 and line.endswith(b"\n"))):
            f.seek(start)
            box, line = [f.read(size)], None
            yield box.pop()
            continue
        line = None
        yield size


def _too_large(n: int, size: int) -> dict:
    return {"__error__": f"line {n}: {size:,} bytes, more than the {MAX_LINE_BYTES:,} a row may have "
                         "(not read; split or shorten it)", "__code__": "ROW_TOO_LARGE", "__raw__": ""}


def _iter_jsonl_lines(path: Path, batch_rows: int) -> Iterator[list[tuple[int, bytes | int]]]:
    """Batches of (line number, line) of the non-blank lines of a JSON lines file (a line over
    MAX_LINE_BYTES comes as its size in bytes, an int, and is never read whole)."""
    batch: list = []
    size = 0  # bytes in the batch: a batch of long lines is cut early, so memory stays bounded
    n = 0  # not enumerate(): its result tuple would keep the last line while a batch is out
    with _open(path) as f:
        for line in _lines(f, MAX_LINE_BYTES):
            n += 1
            if not isinstance(line, int) and (not line or line.isspace()):  # blank (strip() would copy it)
                continue
            batch.append((n, line))
            size += 0 if isinstance(line, int) else len(line)
            if len(batch) >= batch_rows or size > MAX_LINE_BYTES:
                line = None  # only the batch holds its lines (a caller may let them go)
                yield batch
                batch, size = [], 0
    if batch:
        line = None
        yield batch


def _iter_jsonl(path: Path, batch_rows: int) -> Iterator[list]:
    for lines in _iter_jsonl_lines(path, batch_rows):
        sizes = [0 if isinstance(line, int) else len(line) for _, line in lines]
        decode_lines(lines)
        yield readers.Rows(lines, sizes)
        lines = None  # not kept while the next batch is read


def _iter_json_document(path: Path, batch_rows: int) -> Iterator[list]:
    """A .json document streamed element by element (readers.iter_json_document, each element at
    most MAX_LINE_BYTES characters); a file that turns out not to be one JSON document before its
    first batch is read as JSON lines."""
    with _open(path) as f:
        gen = readers.iter_json_document(f, str(path), MAX_LINE_BYTES, batch_rows)
        try:
            first = next(gen, None)
        except DataError as e:
            if not getattr(e, "not_one_document", False):
                raise
            first = gen = None
        if gen is not None:
            if first is not None:
                yield first
            yield from gen
            return
    yield from _iter_jsonl(path, batch_rows)  # not one document: JSON lines after all


def _is_json_lines(path: Path) -> bool:
    """A .json file whose first line is a whole JSON object (not a {"data": [...]} wrapper) and
    that has more lines: JSON lines under a .json name. A one-line file is one JSON document."""
    with _open(path) as f:
        first = f.readline(MAX_LINE_BYTES + 1)
        if len(first) > MAX_LINE_BYTES:
            return False
        more = any(isinstance(line, int) or (line and not line.isspace()) for line in _lines(f, MAX_LINE_BYTES))
    if not more:
        return False
    try:
        obj = json.loads(first)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and not isinstance(obj.get("data"), list)


def _chunks(rows: list, batch_rows: int) -> Iterator[list]:
    for k in range(0, len(rows), batch_rows):
        yield rows[k:k + batch_rows]


def _iter_file(path: Path, batch_rows: int) -> Iterator[list]:
    ext = _ext(path)
    if ext is None:
        raise DataError(f"data error: {path}: unknown file type; use one of {', '.join(EXTENSIONS)}")
    try:
        if ext == ".parquet":
            yield from parquet_reader.iter_parquet(path, MAX_LINE_BYTES, batch_rows)
        elif ext.startswith(".csv"):
            with _open(path) as f:
                yield from readers.iter_csv(f, str(path), MAX_LINE_BYTES, batch_rows)
        elif ext.startswith(".jsonl") or _is_json_lines(path):
            yield from _iter_jsonl(path, batch_rows)
        else:
            yield from _iter_json_document(path, batch_rows)
    except DataError:
        raise
    except (OSError, EOFError, UnicodeDecodeError, ValueError, csv.Error, RecursionError,
            MemoryError) as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: Exception) -> DataError:
    return DataError(f"data error: {path}: cannot be read ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''}); check the file")


def iter_line_batches(source: Any, batch_rows: int = BATCH_ROWS) -> Iterator[list] | None:
    """For a local JSON lines file (or a folder of them only): its batches as undecoded
    ``(line number, line)`` pairs, exactly the batches :func:`iter_batches` yields once each pair
    goes through :func:`decode_line` (so that worker processes can decode them). Else None."""
    if not isinstance(source, (str, Path)) or str(source).startswith(BUILTIN_PREFIX):
        return None
    path = Path(str(source)).expanduser()
    try:
        files = _folder_files(path) if path.is_dir() else [path] if path.is_file() else []
        if not files or not all((_ext(f) or "").startswith(".jsonl")
                                or (_ext(f) in (".json", ".json.gz") and _is_json_lines(f))
                                for f in files):
            return None
    except (DataError, OSError, EOFError, ValueError):
        return None  # iter_batches reports it

    def lines():
        for f in files:
            try:
                yield from _iter_jsonl_lines(f, batch_rows)
            except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:
                raise _unreadable(f, e) from None
    return lines()


def _folder_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _ext(p)
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"data error: {folder}: folder holds no data files ({', '.join(EXTENSIONS)})")
    return files


def _read_file(path: Path) -> list:
    return [r for b in _iter_file(path, BATCH_ROWS) for r in b]


def _builtin_path(name: str) -> Path:
    base, _, split = name.partition("@")
    if base != builtin.NAME or split not in ("", "train", "eval"):
        raise DataError(f"data error: unknown builtin dataset {BUILTIN_PREFIX}{name!r}; use "
                        f"'{BUILTIN_PREFIX}{builtin.NAME}' or '{BUILTIN_PREFIX}{builtin.NAME}@eval'")
    return builtin.materialize()[split or "train"]


def _load_hub(dataset_id: str, split: str | None):
    name, _, at_split = dataset_id.partition("@")
    split = split or at_split or "train"
    try:
        import datasets  # lazy: optional, and seconds to import; only hub sources need it
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown id, missing split: all a user-facing data error
        first = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"data error: cannot load hub dataset {name!r} split {split!r} "
                        f"({type(e).__name__}: {first}); check the id and network access, or give "
                        f"a local file") from None
    return ds


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or _ext(Path(s)) is not None or s.endswith(".gz")


def _columns_to_rows(batch: dict) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, vals)) for vals in zip(*batch.values())] if keys else []


def iter_batches(source: Any, batch_rows: int = BATCH_ROWS, split: str | None = None) -> Iterator[list]:
    """The rows of a source, in order, as lists of at most ``batch_rows`` rows (see the module
    docstring). Raises DataError as :func:`load_rows` does, possibly after some batches."""
    if isinstance(source, list):
        yield from _chunks(source, batch_rows)
        return
    if hasattr(source, "iter") and hasattr(source, "column_names"):  # datasets.Dataset
        for batch in source.iter(batch_size=batch_rows):
            yield _columns_to_rows(batch)
        return
    if hasattr(source, "to_dict") and hasattr(source, "columns") and hasattr(source, "iloc"):
        for k in range(0, len(source), batch_rows):  # pandas.DataFrame
            yield source.iloc[k:k + batch_rows].to_dict("records")
        return
    if not isinstance(source, (str, Path)):
        raise DataError(f"data error: unsupported source type {type(source).__name__}; give a path, "
                        f"a hub id, a datasets.Dataset or a list of dicts")
    s = str(source)
    if s.startswith(BUILTIN_PREFIX):
        yield from _iter_file(_builtin_path(s[len(BUILTIN_PREFIX):]), batch_rows)
        return
    path = Path(s).expanduser()
    if path.is_dir():
        for f in _folder_files(path):
            yield from _iter_file(f, batch_rows)
        return
    if path.is_file():
        yield from _iter_file(path, batch_rows)
        return
    if isinstance(source, Path) or _looks_like_path(s):
        raise DataError(f"data error: {path}: no such file or folder; check data.source / "
                        f"data.eval_source")
    yield from iter_batches(_load_hub(s, split), batch_rows)


def input_size(source: Any) -> tuple[int | None, int | None]:
    """(rows, bytes) of a source when cheap to know, else None for either: the length of an
    in-memory source, the total size of a local file or folder of data files."""
    if isinstance(source, (str, Path)):
        s = str(source)
        if s.startswith(BUILTIN_PREFIX):
            return None, None
        path = Path(s).expanduser()
        try:
            if path.is_file():
                return None, path.stat().st_size
            if path.is_dir():
                return None, sum(f.stat().st_size for f in _folder_files(path))
        except (OSError, DataError):
            pass
        return None, None
    try:
        return len(source), None
    except TypeError:
        return None, None


def load_rows(source: Any, split: str | None = None) -> list:
    """All rows of a source, in order, in one list (see the module docstring for what a source
    can be). For large files use :func:`iter_batches`, which keeps memory bounded.

    ``split`` only matters for hub ids (default: the ``@split`` suffix, else ``train``).
    Raises DataError for a missing file, an unknown extension or an unreachable dataset.
    """
    if isinstance(source, list):
        return list(source)
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset
        return source.to_list()
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # pandas.DataFrame
        return source.to_dict("records")
    return [r for batch in iter_batches(source, BATCH_ROWS, split) for r in batch]


DATE_PLACEHOLDER = "{date}"


def fill_date(source: str, today=None) -> str:
    """``'/data/{date}.jsonl'`` -> ``'/data/2026-11-23.jsonl'`` (``today``: a date; default the UTC
    date now). Sources without the placeholder are returned unchanged."""
    if DATE_PLACEHOLDER not in source:
        return source
    today = today or dt.datetime.now(dt.timezone.utc).date()
    return source.replace(DATE_PLACEHOLDER, today.isoformat())


def newest_partition(folder: str) -> str:
    """The last entry (sub-folder or data file) of ``folder`` sorted by name, hidden ones ignored."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DataError(f"data error: {folder}: data.source_partition=newest needs a folder")
    entries = sorted(p for p in path.iterdir()
                     if not p.name.startswith(".") and (p.is_dir() or _ext(p)))
    if not entries:
        raise DataError(f"data error: {folder}: folder holds no partitions (sub-folders or data files)")
    return str(entries[-1])


def resolve_source(source: str | None, partition: str = "all", today=None) -> str | None:
    """The concrete source of a run: ``{date}`` filled in, then, with ``partition='newest'``, the
    newest partition of the folder taken."""
    if source is None:
        return None
    source = fill_date(source, today)
    return newest_partition(source) if partition == "newest" else source


def source_fingerprint(source: str | None) -> str:
    """Content hash of a local file or folder of files; the id itself for builtin/hub sources."""
    if source is None:
        return "none"
    if source.startswith(BUILTIN_DATASET):
        return f"{source}#{builtin.DATASET_VERSION}"
    p = Path(source).expanduser()
    if p.is_file():
        return file_sha256(p)[:16]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        return fingerprint([(str(f.relative_to(p)), file_sha256(f)) for f in files])
    return f"hub:{source}"
