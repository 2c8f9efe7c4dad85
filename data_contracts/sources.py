"""Turn a data source into a list of raw rows (dicts), whatever it is.

Accepted sources: a local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, the same gzipped
(``.jsonl.gz``, ``.json.gz``, ``.csv.gz``), a folder of such shards (read in sorted order), an
in-memory ``datasets.Dataset`` / ``pandas.DataFrame`` / list of dicts, ``builtin:answer-format``
(``@eval`` for its eval split) and otherwise a hub dataset id (``owner/name``, ``owner/name@split``).

A JSON line that does not parse does not stop loading: it becomes a row ``{"__error__": ...,
"__raw__": line}`` that validation rejects with code BAD_JSON.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any

from data_contracts.errors import DataError

BUILTIN_PREFIX = "builtin:"
EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")


def describe(source: Any) -> str:
    """A short printable name of a source for reports and messages."""
    if isinstance(source, (str, Path)):
        return str(source)
    n = len(source) if hasattr(source, "__len__") else "?"
    return f"<in-memory {type(source).__name__} of {n} rows>"


def _ext(path: Path) -> str | None:
    name = path.name.lower()
    return next((e for e in sorted(EXTENSIONS, key=len, reverse=True) if name.endswith(e)), None)


def _read_text(path: Path) -> str:
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def _jsonl(text: str) -> list[dict]:
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            rows.append({"__error__": f"line {i + 1}: invalid JSON ({e.msg})", "__raw__": line})
    return rows


def _read_file(path: Path) -> list:
    ext = _ext(path)
    if ext is None:
        raise DataError(f"data error: {path}: unknown file type; use one of {', '.join(EXTENSIONS)}")
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        if ext.startswith(".csv"):
            import pandas as pd
            df = pd.read_csv(io.StringIO(_read_text(path)), dtype=str, keep_default_na=False)
            return df.to_dict("records")
        text = _read_text(path)
        if ext.startswith(".jsonl"):
            return _jsonl(text)
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return _jsonl(text)  # a .json file that is really JSON lines
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"data error: {path}: cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); check the file") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"data error: {path}: JSON must be a list of rows or {{\"data\": [...]}}")
    return data


def _read_folder(folder: Path) -> list:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _ext(p)
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"data error: {folder}: folder holds no data files ({', '.join(EXTENSIONS)})")
    rows: list = []
    for f in files:
        rows += _read_file(f)
    return rows


def _load_builtin(name: str) -> list:
    from data_contracts import builtin
    base, _, split = name.partition("@")
    if base != builtin.NAME or split not in ("", "train", "eval"):
        raise DataError(f"data error: unknown builtin dataset {BUILTIN_PREFIX}{name!r}; use "
                        f"'{BUILTIN_PREFIX}{builtin.NAME}' or '{BUILTIN_PREFIX}{builtin.NAME}@eval'")
    return _read_file(builtin.materialize()[split or "train"])


def _load_hub(dataset_id: str, split: str | None) -> list:
    name, _, at_split = dataset_id.partition("@")
    split = split or at_split or "train"
    try:
        import datasets
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown id, missing split: all a user-facing data error
        first = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"data error: cannot load hub dataset {name!r} split {split!r} "
                        f"({type(e).__name__}: {first}); check the id and network access, or give "
                        f"a local file") from None
    return ds.to_list()


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or _ext(Path(s)) is not None or s.endswith(".gz")


def load_rows(source: Any, split: str | None = None) -> list:
    """All rows of a source, in order (see the module docstring for what a source can be).

    ``split`` only matters for hub ids (default: the ``@split`` suffix, else ``train``).
    Raises DataError for a missing file, an unknown extension or an unreachable dataset.
    """
    if isinstance(source, list):
        return list(source)
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # datasets.Dataset
        return source.to_list()
    if hasattr(source, "to_dict") and hasattr(source, "columns"):  # pandas.DataFrame
        return source.to_dict("records")
    if not isinstance(source, (str, Path)):
        raise DataError(f"data error: unsupported source type {type(source).__name__}; give a path, "
                        f"a hub id, a datasets.Dataset or a list of dicts")
    s = str(source)
    if s.startswith(BUILTIN_PREFIX):
        return _load_builtin(s[len(BUILTIN_PREFIX):])
    path = Path(s).expanduser()
    if path.is_dir():
        return _read_folder(path)
    if path.is_file():
        return _read_file(path)
    if isinstance(source, Path) or _looks_like_path(s):
        raise DataError(f"data error: {path}: no such file or folder; check data.source / "
                        f"data.eval_source")
    return _load_hub(s, split)
