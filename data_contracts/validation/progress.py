"""The progress bar (with ETA) of one split's validation, advanced as the source's batches are read.

Its total is the source's rows where they are known before reading (an in-memory source, a Parquet
file's metadata), else the bytes of a plain JSON lines, JSON or CSV file (the bar advances by the
size of each row as read; it ends at 100% when the split is done), else there is none and the bar
counts rows (a folder of shards, a gzip file, a hub dataset, the builtin set). A holdout side
(``data.eval_fraction``) reads the whole source, so its bar covers the whole source too. With
workers the bar shows what was read, at most a few batches ahead of what was validated. It is shown
on a terminal only (stderr piped or captured: none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from data_contracts.sources import BUILTIN_PREFIX, input_size
from data_contracts.validation.workers import row_sizes

BYTE_SUFFIXES = (".jsonl", ".json", ".csv")  # a row's size as read is its bytes (or characters) there


class _Bar(tqdm):
    monitor_interval = 0  # no monitor thread: the validation workers are forked while the bar runs


def progress_total(source: Any) -> tuple[int | None, str]:
    """(total, unit) of a source's validation bar: rows (``"row"``), bytes (``"B"``) or unknown."""
    rows, size = input_size(source)
    if rows is not None:
        return rows, "row"
    if isinstance(source, (str, Path)) and not str(source).startswith(BUILTIN_PREFIX):
        path = Path(str(source)).expanduser()
        name = path.name.lower()
        if path.is_file() and name.endswith(".parquet"):
            try:
                return pq.ParquetFile(path).metadata.num_rows, "row"
            except (OSError, ValueError):  # unreadable: validation reports it
                return None, "row"
        if path.is_file() and name.endswith(BYTE_SUFFIXES) and size:
            return size, "B"
    return None, "row"


class SplitProgress:
    """``validate <split>``: :meth:`read` each batch as it comes from the source, :meth:`done` when
    every row was validated, :meth:`close` in any case."""

    def __init__(self, source: Any, split: str):
        total, unit = progress_total(source)
        self.in_bytes = unit == "B"
        # on a terminal only: `dpo validate`'s stderr stays its one line of error when piped
        self.bar = _Bar(total=total, desc=f"validate {split}", unit=unit, unit_scale=self.in_bytes,
                        unit_divisor=1024 if self.in_bytes else 1000, disable=None)

    def read(self, rows: list, lines: bool = False) -> None:
        """One batch read (``lines``: undecoded JSON lines)."""
        if self.in_bytes:
            self.bar.update(sum(row_sizes(rows, lines) or ()))
        else:
            self.bar.update(len(rows))

    def done(self) -> None:
        """The split is validated: a bar in bytes ends at its total (blank lines, JSON punctuation
        and multi-byte characters are not in the rows' sizes)."""
        if self.in_bytes and self.bar.total:
            self.bar.n = self.bar.total
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
