"""The shared reference log-prob cache: Parquet shards per cache key, reused across runs.

The log-probs come from :mod:`dpo_engine.reference.compute`. A cache entry is a folder named by its
key (fingerprints of model, tokenizer, data, length settings, dtype, engine version) under the shared cache folder:

    <cache>/<key>/part-00000.parquet ...   one shard per ``shard_size`` examples, atomic writes
    <cache>/<key>/_COMPLETE.json           written last: metadata, row count, shard list

A crash leaves finished shards behind and the next run computes only the missing ones. Reading
verifies metadata, row count, example ids, that every log-prob is finite (no NaN or inf) and each
shard's sha256 against the one ``_COMPLETE.json`` recorded (a flipped byte in a data page would
otherwise read back as a different finite log-prob); a damaged shard is reported, removed with the
folder's ``_COMPLETE.json`` (so the precompute stage is not reused and its next run heals the cache,
whoever found the damage: precompute or training) and recomputed. A SIGKILL mid-write leaves a temporary file
(``.part-00000.parquet.tmp<pid>``); the next write or read of the folder removes those whose writer
process is gone (never a live one's). Concurrent runs on one key serialise on a file lock, so the
work is done once and never corrupted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.helpers import atomic_write, dead_writer_temp, file_lock, sha256_file, write_json

ENGINE_VERSION = "0.2"
META_KEY = b"dpo_refcache"
COMPLETE = "_COMPLETE.json"


class CacheError(RuntimeError):
    pass


class DamagedShard(CacheError):
    """A shard whose bytes differ from the sha256 recorded when it was written."""

    def __init__(self, message: str, shard: str):
        super().__init__(message)
        self.shard = shard


def write_cache(df: pd.DataFrame, path: Path, meta: dict) -> None:
    """Atomic write (temporary file, then rename) with the metadata in the Parquet schema."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           META_KEY: json.dumps(meta, sort_keys=True).encode()})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_cache(path: Path, expect_ids: list[str] | None = None, expect_key: str | None = None
               ) -> pd.DataFrame:
    """Read a cache file or a complete cache folder and verify key, row count and example ids."""
    path = Path(path)
    if path.is_dir():
        _remove_leftovers_unless_writing(path)
        return _read_folder(path, expect_ids, expect_key)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise CacheError(f"reference cache {path} is unreadable ({e}); delete it to rebuild") from None
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    if expect_key is not None and meta.get("key") != expect_key:
        raise CacheError(f"reference cache {path} has key {meta.get('key')}, expected {expect_key}")
    df = table.to_pandas()
    _check_ids(path, df, expect_ids)
    _check_finite(path, df)
    df.attrs["meta"] = meta
    return df


def _non_finite(df: pd.DataFrame) -> str | None:
    """What is not finite in the log-prob columns (``*_logps``) of ``df``, else None."""
    bad = []
    for col in (c for c in df.columns if c.endswith("_logps")):
        values = np.asarray(df[col], dtype=np.float64)
        mask = ~np.isfinite(values)
        if mask.any():
            first = int(np.flatnonzero(mask)[0])
            eid = df["example_id"].iloc[first] if "example_id" in df.columns else first
            bad.append(f"{int(mask.sum())} in {col} (first: example {eid}, {values[first]})")
    return "; ".join(bad) or None


def _check_finite(path: Path, df: pd.DataFrame) -> None:
    what = _non_finite(df)
    if what is not None:
        raise CacheError(f"reference cache {path} holds non-finite log-probs (NaN or inf: {what}); "
                         "delete it to rebuild")


def _check_ids(path: Path, df: pd.DataFrame, expect_ids: list[str] | None) -> None:
    if expect_ids is None:
        return
    missing = set(expect_ids) - set(df["example_id"])
    if missing or len(df) != len(expect_ids):
        raise CacheError(f"reference cache {path}: {len(df)} rows for {len(expect_ids)} examples, "
                         f"{len(missing)} example ids missing")



def _locked(folder: Path):
    return file_lock(folder.parent / f".{folder.name}.lock")


def remove_leftovers(folder: Path, log: Callable[[str], None] | None = None) -> list[str]:
    """Remove the temporary files (``.<name>.tmp<pid>``) that a killed writer left in a cache folder,
    only those whose process no longer runs on this machine: a live writer's (a concurrent run's)
    are left alone. Returns the names removed; a folder that cannot be written is left as it is."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for f in entries:
        if not dead_writer_temp(f.name):
            continue
        try:
            f.unlink()
        except FileNotFoundError:
            continue  # another reader removed it first
        except OSError:
            continue  # read-only cache: leave it
        removed.append(f.name)
    if removed and log:
        log(f"reference cache {folder}: removed {len(removed)} file(s) left by a killed writer "
            f"({', '.join(sorted(removed)[:3])}{', ...' if len(removed) > 3 else ''})")
    return removed


def _remove_leftovers_unless_writing(folder: Path) -> None:
    """``remove_leftovers`` for a plain read: only while no writer holds the folder's lock (a writer in
    another pid namespace or on another machine would look dead), and never waiting for it."""
    try:
        with file_lock(folder.parent / f".{folder.name}.lock", block=False) as mine:
            if mine:  # else being written: that writer cleans up
                remove_leftovers(folder)
    except OSError:
        return  # a read-only cache


def _invalidate(folder: Path, shard: str) -> None:
    """Remove a damaged shard and the folder's completion marker (unless a writer holds the folder:
    it is rewriting it), so that no stage trusts the folder until it is rebuilt."""
    try:
        with file_lock(folder.parent / f".{folder.name}.lock", block=False) as mine:
            if mine:
                (folder / COMPLETE).unlink(missing_ok=True)
                (folder / shard).unlink(missing_ok=True)
    except OSError:
        return  # a read-only cache: reported by the caller's error


def _shard_name(i: int) -> str:
    return f"part-{i:05d}.parquet"


def _read_folder(folder: Path, expect_ids, expect_key) -> pd.DataFrame:
    try:
        meta = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError):
        raise CacheError(f"reference cache {folder} is incomplete (no {COMPLETE})") from None
    if expect_key is not None and meta.get("key") != expect_key:
        raise CacheError(f"reference cache {folder} has key {meta.get('key')}, expected {expect_key}")
    parts = [read_cache(folder / name, expect_key=meta["key"]) for name in meta["shards"]]
    for name, digest in (meta.get("sha256") or {}).items():  # readable, finite: but the bytes written?
        if sha256_file(folder / name) != digest:
            _invalidate(folder, name)
            raise DamagedShard(f"reference cache {folder}: shard {name} does not match the sha256 recorded "
                               f"when it was written (damaged on disk); it and {COMPLETE} are removed: the "
                               "next precompute recomputes that shard", name)
    df = pd.concat(parts, ignore_index=True)
    if len(df) != meta["rows"]:
        raise CacheError(f"reference cache {folder}: {len(df)} rows, metadata says {meta['rows']}")
    _check_ids(folder, df, expect_ids)
    df.attrs["meta"] = meta
    return df


def cached_reference_logps(cache_dir: Path, key: str, rows: pd.DataFrame, meta: dict,
                           compute: Callable[[pd.DataFrame], pd.DataFrame], *,
                           shard_size: int = 1024, log: Callable[[str], None] = print) -> tuple[pd.DataFrame, dict]:
    """Reference log-probs of ``rows`` from ``cache_dir/key``, computing only what is missing.

    ``compute(rows_subset)`` runs the reference model. Returns (frame in ``rows`` order, stats with
    ``computed_examples`` = how many examples needed forward passes this time (0 on a full hit)).
    """
    folder = Path(cache_dir) / key
    ids = rows["example_id"].tolist()
    with _locked(folder):
        remove_leftovers(folder, log)
        if (folder / COMPLETE).is_file():
            try:
                df = _read_folder(folder, ids, key)
                return df.set_index("example_id").loc[ids].reset_index(), {"computed_examples": 0,
                                                                            "path": str(folder)}
            except CacheError as e:
                log(f"{e}; rebuilding the damaged parts")
                (folder / COMPLETE).unlink(missing_ok=True)
                if isinstance(e, DamagedShard):  # (this process holds the lock: _invalidate left it)
                    (folder / e.shard).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        shards, computed = [], 0
        for i, s0 in enumerate(range(0, len(rows), shard_size)):
            part = rows.iloc[s0:s0 + shard_size]
            path = folder / _shard_name(i)
            shards.append(path.name)
            if path.is_file():
                try:  # finished by an earlier (crashed) run
                    read_cache(path, expect_ids=part["example_id"].tolist(), expect_key=key)
                    continue
                except CacheError as e:
                    log(f"{e}; recomputing it")
            df = compute(part)
            what = _non_finite(df)
            if what is not None:  # never cached: the reference model itself overflowed
                raise CacheError(f"reference cache {folder}: the reference model gave non-finite log-probs "
                                 f"for shard {i} ({what}; compute dtype {meta.get('dtype', '?')}), not cached; "
                                 f"check the model's weights, or compute in float32 (an fp16 overflow?)")
            write_cache(df, path, {**meta, "key": key, "shard": i})
            computed += len(part)
        for stale in set(p.name for p in folder.glob("part-*.parquet")) - set(shards):
            (folder / stale).unlink()
        complete = {**meta, "key": key, "rows": len(rows), "shards": shards,
                    "sha256": {name: sha256_file(folder / name) for name in shards}}
        write_json(folder / COMPLETE, complete, sort_keys=True)
        df = _read_folder(folder, ids, key)
    return df.set_index("example_id").loc[ids].reset_index(), {"computed_examples": computed,
                                                                "path": str(folder)}
