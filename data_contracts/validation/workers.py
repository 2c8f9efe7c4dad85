"""Parallel validation: forked worker processes parse and tokenize batches (JSON lines: decode
them too) while the parent deduplicates and writes them in source order, so the output is
byte-identical to a serial run.

Memory in flight is bounded in bytes as well as in batches, whatever num_proc: the parent keeps
the raw rows of the batches in flight (for the raw text of rejects, and to redo a batch whose worker
failed), at most WINDOW_BYTES of them beyond one batch; a batch goes to the workers in parts of at
most :func:`part_bytes` (a longer row alone), and the parts being worked on hold at most
WORK_BYTES in all beyond one part; a row over half of it is prepared in this process instead of
being copied to a worker and back. Sizes: the
bytes of a JSON line, else what the reader measured (``rows.sizes``,
:class:`data_contracts.readers.Rows`; none for in-memory sources: only the batch count bounds
those). A worker sends back a reject's raw text already cut to ``data.max_text_chars``
(:class:`~data_contracts.validation.rows.RawText`), not the whole row."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from data_contracts.config import DataConfig
from data_contracts.examples import RowError
from data_contracts.sources import decode_lines, input_size
from data_contracts.validation.encoding import encode_rows
from data_contracts.validation.rows import RawText, parse_rows, raw_text


@dataclass
class PreparedBatch:
    """One batch parsed and tokenized by a worker: what
    :meth:`~data_contracts.validation.split.SplitValidation.batch` needs from it."""
    bad: list  # [(index, RowError, raw)]
    parsed: list  # [(offset, index, example id, None, None)]: the parent holds the raw rows
    status: dict  # index -> table position or RowError, for each first occurrence in the batch
    table: pa.Table | None
    truncated: list


_WORKER: tuple | None = None  # (layout, cfg, tokenizer, vision rows), set before the fork


def _work(rows: list, idx, lines: bool) -> PreparedBatch:
    """Parse and tokenize one batch in a worker process (each example id once per batch);
    ``lines``: the rows are undecoded JSON lines."""
    layout, cfg, tok, vision = _WORKER
    if lines:  # in place: each line is let go once decoded
        decode_lines(rows)
    bad, parsed = parse_rows(rows, idx, layout, cfg.columns, cfg.text_char_limit,
                             vision.store if vision is not None else None)
    first: set[str] = set()
    todo = []
    for p in parsed:
        if p[2] not in first:
            first.add(p[2])
            todo.append(p)
    status, table, truncated = encode_rows(todo, tok, cfg, vision)
    keep = cfg.text_char_limit  # what the parent's reject record keeps of a raw row
    bad = [(i, err, RawText(raw_text(raw, keep))) for i, err, raw in bad]
    return PreparedBatch(bad, [(off, i, eid, None, None) for off, i, eid, _, _ in parsed],
                         {p[1]: st for p, st in zip(todo, status)}, table, truncated)


LARGE_INPUT_ROWS = 50_000
LARGE_INPUT_BYTES = 16 * 2**20


def resolve_num_proc(cfg: DataConfig, source: Any) -> int:
    """``data.num_proc``, or for auto: min(CPUs, 8) for a large input (LARGE_INPUT_ROWS rows or
    LARGE_INPUT_BYTES of files), else 1."""
    if cfg.num_proc is not None:
        return cfg.num_proc
    rows, size = input_size(source)
    large = (rows or 0) >= LARGE_INPUT_ROWS or (size or 0) >= LARGE_INPUT_BYTES
    return min(os.cpu_count() or 1, 8) if large else 1


WINDOW_BYTES = 64 * 2**20  # raw input of the batches in flight, kept here (one batch at least)
WORK_BYTES = 32 * 2**20  # input of the parts sent and not back yet (one part at least)


def part_bytes(n: int) -> int:
    """The input of one part of a batch with ``n`` workers: 2n parts fit WORK_BYTES."""
    return max(WORK_BYTES // (2 * n), 2**20)


def row_sizes(rows: list, lines: bool) -> list[int] | None:
    """The size of each row of a batch as read: the bytes of each JSON line (``lines``: undecoded
    ``(number, line)`` pairs; 0 for one over the row limit, given as its length), else what the
    reader measured (``rows.sizes``), else None (an in-memory source)."""
    if lines:
        return [0 if isinstance(line, int) else len(line) for _, line in rows]
    return getattr(rows, "sizes", None)


def _parts(rows: list, lines: bool, limit: int) -> list[tuple[int, int, int]]:
    """(start, end, bytes) of the consecutive parts of at most ``limit`` bytes (a longer row
    alone) a batch goes to the workers in."""
    sizes = row_sizes(rows, lines)
    if not sizes:
        return [(0, len(rows), 0)]
    parts, start, size = [], 0, 0
    for k, s in enumerate(sizes):
        if k > start and size + s > limit:
            parts.append((start, k, size))
            start, size = k, 0
        size += s
    parts.append((start, len(rows), size))
    return parts


RELEASE_BYTES = 2**24


def _noop() -> None:
    """A task that does nothing (see :meth:`_InFlight.send`)."""


def _merge(results: list[tuple[int, PreparedBatch]]) -> PreparedBatch:
    """One PreparedBatch of a batch from those of its parts ((first offset, prepared) each)."""
    if len(results) == 1:
        return results[0][1]
    bad, parsed, status, tables, truncated = [], [], {}, [], []
    for start, p in results:
        bad += p.bad
        parsed += [(off + start, i, eid, a, b) for off, i, eid, a, b in p.parsed]
        shift = len(truncated)  # table rows of the parts before
        status.update((i, st if isinstance(st, RowError) else st + shift) for i, st in p.status.items())
        if p.table is not None:
            tables.append(p.table)
        truncated += p.truncated
    table = pa.concat_tables(tables).combine_chunks() if tables else None
    return PreparedBatch(bad, parsed, status, table, truncated)


class _Batch:
    """A batch in flight: its rows (undecoded JSON lines when ``lines``), and its parts [start,
    bytes, future, result, collected]."""

    def __init__(self, rows: list, idx, size: int, lines: bool):
        self.rows, self.idx, self.size, self.lines, self.parts, self.sent = rows, idx, size, lines, [], False

    def done(self) -> bool:
        return self.sent and all(part[4] for part in self.parts)


class _InFlight:
    """The batches sent to the pool and not yet written, consumed in source order."""

    def __init__(self, run, pool, n: int):
        self.run, self.pool, self.n = run, pool, n
        self.batches: deque[_Batch] = deque()
        self.parts: deque[tuple[_Batch, list]] = deque()  # sent, not collected, in the order sent
        self.batch_bytes = self.part_bytes = 0

    def send(self, rows: list, idx, lines: bool) -> None:
        parts = _parts(rows, lines, part_bytes(self.n))
        batch = _Batch(rows, idx, sum(p[2] for p in parts), lines)
        self.batches.append(batch)
        self.batch_bytes += batch.size
        for start, end, size in parts:
            if end - start == 1 and size > WORK_BYTES // 2:  # one huge row: prepared here, not
                batch.parts.append([start, size, None, _here(rows[start:end], idx[start:end], lines), True])
                continue  # copied to a worker and back (half the memory)
            while self.parts and (len(self.parts) >= 2 * self.n or self.part_bytes + size > WORK_BYTES):
                self._collect()
            try:
                fut = self.pool.submit(_work, rows[start:end], idx[start:end], lines)
                if size > RELEASE_BYTES:  # the queue's feeder keeps the last item it pickled
                    self.pool.submit(_noop)  # until the next one: let this part go once sent
            except Exception:  # BrokenProcessPool: a worker died
                fut = None
            part = [start, size, fut, None, False]
            batch.parts.append(part)
            self.parts.append((batch, part))
            self.part_bytes += size
        batch.sent = True
        self._finish_ready()
        # room for the next batch, taken to be as large as this one, before it is read
        while self.batches and (len(self.batches) >= 2 * self.n
                                or self.batch_bytes + batch.size > WINDOW_BYTES):
            self.finish_oldest()

    def _collect(self) -> None:
        """Wait for the oldest part sent; write the batches that are complete."""
        _, part = self.parts.popleft()
        try:
            part[3] = part[2].result() if part[2] is not None else None
        except Exception:  # a row too deeply nested to pickle, a worker that died: done here
            part[3] = None
        part[2], part[4] = None, True
        self.part_bytes -= part[1]
        self._finish_ready()

    def _finish_ready(self) -> None:
        while self.batches and self.batches[0].done():
            batch = self.batches.popleft()
            self.batch_bytes -= batch.size
            results = [(start, result) for start, _, _, result, _ in batch.parts]
            rows, idx, lines = batch.rows, batch.idx, batch.lines
            if any(result is None for _, result in results):  # a part failed: the batch here
                if lines:
                    decode_lines(rows)
                self.run.batch(rows, idx)
            else:
                self.run.batch(rows, idx, _merge(results), lines)

    def finish_oldest(self) -> None:
        oldest = self.batches[0]
        while self.batches and self.batches[0] is oldest:
            self._collect()


def _here(rows: list, idx, lines: bool) -> PreparedBatch | None:
    """A part prepared in this process as a worker would (None: it failed, the batch is redone)."""
    try:
        return _work(rows, idx, lines)
    except Exception:
        return None


def _preload() -> None:
    """Import before forking what a worker's first batch would import lazily, so that the workers
    share this process's copy instead of each importing its own: pandas (pyarrow imports it on
    its first conversion of Python values, ~60 MiB)."""
    pa.array([0])


def run_parallel(run, batches, n: int, lines: bool = False) -> None:
    """Batches of ``run`` (a :class:`~data_contracts.validation.split.SplitValidation`) to ``n``
    forked workers (they see the run's layout, config and tokenizer), results consumed in source
    order, at most 2n batches and 2n parts in flight and bytes bounded (see the module docstring).
    A batch a worker fails on for any reason (a pool broken by a killed worker included) is done in
    this process instead: same output, never a hang.
    ``lines``: the batches are undecoded JSON lines (:func:`sources.iter_line_batches`)."""
    global _WORKER
    pool, flight, sent = None, None, 0
    env = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # forked workers: one thread each, no warning
    try:
        for rows, idx in batches:
            if run.layout is None:  # on the first rows, decoded (then let go: the lines go)
                head = rows[:200] if lines else rows
                if lines:
                    decode_lines(head)
                run.detect(head)
                head = None
            if pool is None:
                _WORKER = (run.layout, run.cfg, run.tok, run.vision)
                _preload()
                pool = ProcessPoolExecutor(n, mp_context=mp.get_context("fork"))
                flight = _InFlight(run, pool, n)
            if idx is None:
                idx = range(sent, sent + len(rows))
            sent += len(rows)
            flight.send(rows, idx, lines)
            rows = idx = None  # only the batches in flight hold rows while the next is read
        while flight is not None and flight.batches:
            flight.finish_oldest()
    finally:
        if env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = env
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        _WORKER = None
