"""The metric history of a training, kept beside its checkpoints as ``history.jsonl`` (one JSON
line per optimizer step) instead of inside every checkpoint's ``state.json``: a checkpoint records
how many entries, how many bytes and the sha256 of that prefix, so a save writes only the steps
since the last one (its cost stays the same at step 20,000 as at step 50), and a resume reads the
prefix back once and checks it.

Appends go after the last recorded byte (a tail a killed run left is cut first); when the file does
not start with the history in memory (a fresh training in an old folder), it is replaced whole,
atomically, so the prefix an older checkpoint names is never torn.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_contracts.helpers import atomic_write

HISTORY = "history.jsonl"


def _lines(entries: list[dict]) -> bytes:
    return b"".join(json.dumps(h).encode() + b"\n" for h in entries)


class HistoryLog:
    """``history.jsonl`` of one checkpoint folder, as this process last wrote it."""

    def __init__(self, ckpt_dir: Path):
        self.path = Path(ckpt_dir) / HISTORY
        self.n, self.size, self.sha = 0, 0, hashlib.sha256()
        self.synced = False

    def sync(self, history: list[dict]) -> dict:
        """Make the file hold ``history`` (appending what is new) and return what a checkpoint of it
        records: ``history_len``, ``history_bytes``, ``history_sha256``."""
        if not self.synced or self.n > len(history):
            self._adopt(history)
        data = _lines(history[self.n:])
        if data or self.path.stat().st_size != self.size:
            with open(self.path, "r+b") as fh:
                fh.seek(self.size)
                fh.truncate()
                fh.write(data)
        self.sha.update(data)
        self.n, self.size = len(history), self.size + len(data)
        return {"history_len": self.n, "history_bytes": self.size, "history_sha256": self.sha.hexdigest()}

    def _adopt(self, history: list[dict]) -> None:
        """First sync of this process: keep the file if it starts with ``history`` (a resumed run: one
        read, then appends), else replace it whole with ``history``."""
        data = _lines(history)
        try:
            with open(self.path, "rb") as fh:
                same = fh.read(len(data)) == data
        except FileNotFoundError:
            same = False
        if not same:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, lambda tmp: Path(tmp).write_bytes(data))
        self.n, self.size, self.sha = len(history), len(data), hashlib.sha256(data)
        self.synced = True


_LOGS: dict[Path, HistoryLog] = {}


def sync_history(ckpt_dir: Path, history: list[dict]) -> dict:
    """:meth:`HistoryLog.sync` of ``ckpt_dir``'s log (one per folder and process)."""
    key = Path(ckpt_dir).resolve()
    log = _LOGS.get(key)
    if log is None:
        log = _LOGS[key] = HistoryLog(key)
    return log.sync(history)


def read_history(ckpt_dir: Path, n: int, size: int, sha256: str) -> list[dict] | None:
    """The first ``n`` entries of ``ckpt_dir/history.jsonl`` if its first ``size`` bytes have the
    recorded sha256 and hold exactly ``n`` entries, else None (missing, cut or changed)."""
    try:
        with open(Path(ckpt_dir) / HISTORY, "rb") as fh:
            data = fh.read(size)
    except OSError:
        return None
    if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
        return None
    try:
        entries = [json.loads(line) for line in data.splitlines()]
    except ValueError:
        return None
    return entries if len(entries) == n else None
