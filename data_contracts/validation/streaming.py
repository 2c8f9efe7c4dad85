"""What a streaming validation keeps while batches pass: the example ids already kept (for
duplicates), the statistics of the written rows, and the Parquet files being written."""

from __future__ import annotations

import hashlib
import math
from array import array
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class SeenIds:
    """Example ids already kept, as sorted uint64 keys + the row index of each (16 bytes a row)."""

    def __init__(self):
        self.keys = np.empty(0, dtype=np.uint64)
        self.rows = np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """For each key, the row index it was first kept at, else -1."""
        if len(self.keys) == 0 or len(keys) == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        pos = np.searchsorted(self.keys, keys)
        clipped = np.minimum(pos, len(self.keys) - 1)
        hit = self.keys[clipped] == keys
        return np.where(hit, self.rows[clipped], -1)

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Insert new (not yet present, mutually distinct) keys."""
        if len(keys) == 0:
            return
        order = np.argsort(keys, kind="stable")
        keys, rows = keys[order], rows[order]
        pos = np.searchsorted(self.keys, keys)
        self.keys = np.insert(self.keys, pos, keys)
        self.rows = np.insert(self.rows, pos, rows)


def length_stats(xs) -> dict:
    """min, mean, max and p95 of token lengths (all 0 for none)."""
    if len(xs) == 0:
        return {"min": 0, "mean": 0.0, "max": 0, "p95": 0}
    s = np.sort(np.asarray(xs, dtype=np.int64))
    return {"min": int(s[0]), "mean": round(float(s.mean()), 2), "max": int(s[-1]),
            "p95": int(s[max(0, math.ceil(0.95 * len(s)) - 1)])}


class ValidStats:
    """What the report says about the written valid rows, accumulated as they are written."""

    def __init__(self):
        self.lens = {k: array("i") for k in ("prompt", "chosen", "rejected")}
        self.truncated_rows = self.truncated_tokens = self.rows = 0
        self.fp = hashlib.sha256()

    def add(self, eids, p_lens, c_lens, r_lens, truncated) -> None:
        for eid in eids:
            self.fp.update((("\n" if self.rows else "") + eid).encode())
            self.rows += 1
        self.lens["prompt"].extend(p_lens)
        self.lens["chosen"].extend(c_lens)
        self.lens["rejected"].extend(r_lens)
        self.truncated_rows += sum(t > 0 for t in truncated)
        self.truncated_tokens += sum(truncated)

    def report(self) -> dict:
        return {"lengths": {k: length_stats(v) for k, v in self.lens.items()},
                "truncated": {"rows": self.truncated_rows, "tokens": self.truncated_tokens},
                "fingerprint": self.fp.hexdigest()}


class ParquetSink:
    """A Parquet file at ``path`` written batch by batch. The caller writes it at a temporary path
    (``data_contracts.helpers.atomic_write``), so readers never see it half written."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.writer = pq.ParquetWriter(path, schema)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def close_quietly(self) -> None:
        """Close while already failing: the original error is the one to report."""
        try:
            self.close()
        except Exception:
            pass
