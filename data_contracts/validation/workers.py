"""Parallel validation: forked worker processes parse and tokenize batches (JSON lines: decode
them too) while the parent deduplicates and writes them in source order, so the output is
byte-identical to a serial run."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from data_contracts.config import DataConfig
from data_contracts.sources import decode_line, input_size
from data_contracts.validation.encoding import encode_rows
from data_contracts.validation.rows import parse_rows


@dataclass
class PreparedBatch:
    """One batch parsed and tokenized by a worker: what
    :meth:`~data_contracts.validation.split.SplitValidation.batch` needs from it."""
    bad: list  # [(index, RowError, raw)]
    parsed: list  # [(offset, index, example id, None, None)]: the parent holds the raw rows
    status: dict  # index -> table position or RowError, for each first occurrence in the batch
    table: pa.Table | None
    truncated: list


_WORKER: tuple | None = None  # (layout, cfg, tokenizer), set before the fork


def _work(rows: list, idx, lines: bool) -> PreparedBatch:
    """Parse and tokenize one batch in a worker process (each example id once per batch);
    ``lines``: the rows are undecoded JSON lines."""
    layout, cfg, tok = _WORKER
    if lines:
        rows = [decode_line(n, line) for n, line in rows]
    bad, parsed = parse_rows(rows, idx, layout, cfg.columns, cfg.text_char_limit)
    first: set[str] = set()
    todo = []
    for p in parsed:
        if p[2] not in first:
            first.add(p[2])
            todo.append(p)
    status, table, truncated = encode_rows(todo, tok, cfg)
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


def _finish_batch(run, lines: bool, rows: list, idx, fut) -> None:
    try:
        prepared = fut.result() if fut is not None else None
    except Exception:  # a row too deeply nested to pickle, a worker that died: do it here
        prepared = None
    if prepared is None:
        run.batch([decode_line(n, line) for n, line in rows] if lines else rows, idx)
    else:
        run.batch(rows, idx, prepared, lines)


def run_parallel(run, batches, n: int, lines: bool = False) -> None:
    """Batches of ``run`` (a :class:`~data_contracts.validation.split.SplitValidation`) to ``n``
    forked workers (they see the run's layout, config and tokenizer), results consumed in source
    order, at most 2n batches in flight. A batch whose worker fails for any reason (a pool broken
    by a killed worker included) is done in this process instead: same output, never a hang.
    ``lines``: the batches are undecoded JSON lines (:func:`sources.iter_line_batches`)."""
    global _WORKER
    pool, window, sent = None, deque(), 0
    env = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # forked workers: one thread each, no warning
    try:
        for rows, idx in batches:
            if run.layout is None:
                run.detect([decode_line(*r) for r in rows[:200]] if lines else rows)
            if pool is None:
                _WORKER = (run.layout, run.cfg, run.tok)
                pool = ProcessPoolExecutor(n, mp_context=mp.get_context("fork"))
            if idx is None:
                idx = range(sent, sent + len(rows))
            sent += len(rows)
            try:
                fut = pool.submit(_work, rows, idx, lines)
            except Exception:  # BrokenProcessPool: a worker died
                fut = None
            window.append((rows, idx, fut))
            if len(window) >= 2 * n:
                _finish_batch(run, lines, *window.popleft())
        while window:
            _finish_batch(run, lines, *window.popleft())
    finally:
        if env is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = env
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        _WORKER = None
