"""Validate one split: stream, check row by row, tokenize in batches, write valid/rejects/report.

Every input row ends up in exactly one bucket, so ``rows_in = valid + rejected + duplicates +
limited_out``. Files written into out_dir (each through a temporary file renamed onto it,
``data_contracts.helpers.atomic_write``):

- ``valid.parquet``: the contract the engine reads (VALID_SCHEMA).
- ``rejects.parquet``: source_index, code, field, message, raw (JSON of the raw row); duplicates
  are listed there too with code DUPLICATE_ROW.
- ``report.json`` and ``summary.md``: counts, reasons, length stats, fingerprint, policy verdict.

Streaming: rows come from :func:`sources.iter_batches` one batch (``batch_rows``) at a time, are
checked, deduplicated, tokenized with one tokenizer call per batch and appended to the parquet files
with ``pq.ParquetWriter``, so memory does not grow with the raw data. With ``num_proc`` > 1
(``data.num_proc``; auto: only for large inputs) forked workers parse, check and tokenize the
batches (JSON lines files: decode them too) while this process deduplicates and writes them in
source order, at most 2 x num_proc batches in flight, bounded in bytes too (:mod:`.workers`); the output is byte-identical to a serial
run. What does grow with the row count is small and fixed per row: the example ids seen (8-byte
key + 8-byte row index, in sorted numpy arrays) and three int32 lengths for the report's statistics.

``limit``: the N valid rows whose seeded hash ``blake2b(example_id, key=shuffle_seed)`` is smallest
(a heap of N entries while streaming); they are then copied, in source order, from the temporary
valid file into the final one. The choice is deterministic, independent of row order and batch size,
and changes with ``shuffle_seed``.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_contracts.config import DataConfig
from data_contracts.errors import DataError, DataPolicyError
from data_contracts.examples import RowError
from data_contracts.helpers import atomic_path, atomic_write, remove_dead_temps, sha256_file
from data_contracts.images import ImageStore, VisionRows, base_dir
from data_contracts.layouts import detect_layout, map_columns
from data_contracts.readers import Rows
from data_contracts.sources import BATCH_ROWS, decode_line, describe, iter_batches, iter_line_batches
from data_contracts.validation.encoding import encode_rows
from data_contracts.validation.holdout import in_holdout
from data_contracts.validation.progress import SplitProgress
from data_contracts.validation.report import build_report, check_not_empty, write_report
from data_contracts.validation.rows import parse_rows, reject_record
from data_contracts.validation.schemas import REJECT_SCHEMA, VALID_SCHEMA
from data_contracts.validation.streaming import ParquetSink, SeenIds, ValidStats
from data_contracts.validation.workers import PreparedBatch, resolve_num_proc, run_parallel


def _limit_priority(eid: str, seed: int) -> int:
    key = seed.to_bytes(8, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(eid.encode(), digest_size=8, key=key).digest(), "big")


class SplitValidation:
    """The state of one validate_split call: counts, the ids kept, the limit heap, and the
    valid/rejects files being written (:meth:`open`)."""

    def __init__(self, tok, cfg: DataConfig, split: str, label: str, limit: int | None):
        self.tok, self.cfg, self.split, self.label, self.limit = tok, cfg, split, label, limit
        self.layout = None
        self.rows_in = self.n_valid = self.rejected = self.duplicates = 0
        self.source_rows = 0  # rows read from the source, both sides of a holdout split
        self.counts: Counter = Counter()
        self.first_msg: dict[str, str] = {}
        self.seen = SeenIds()
        self.stats = ValidStats()
        self.heap: list[tuple[int, int, int]] = []  # (-priority, source_index, truncated), limit only
        self.valid_path: Path | None = None
        self.scratch: Path | None = None
        self.valid = self.rejects = None
        self.vision: VisionRows | None = None  # rows with images: their store and the processor
        self.progress: SplitProgress | None = None  # the bar, advanced as the source is read

    @property
    def image_store(self) -> ImageStore | None:
        return self.vision.store if self.vision is not None else None

    def open(self, valid_path: Path, rejects_path: Path) -> None:
        """Start writing valid rows to ``valid_path`` and rejects to ``rejects_path``. With a limit
        the valid rows go to a scratch file first (:meth:`finish_valid` picks from it)."""
        self.valid_path = valid_path
        if self.limit is not None:
            self.scratch = atomic_path(valid_path.with_name("valid.all.parquet"))
        self.valid = ParquetSink(self.scratch or valid_path, VALID_SCHEMA)
        self.rejects = ParquetSink(rejects_path, REJECT_SCHEMA)

    def _fail(self, i: int, err: RowError) -> None:
        raise DataError(f"data error: {self.split} row {i} of {self.label}: {err.code} in field "
                        f"'{err.field}': {err.message} (data.invalid_policy=fail; use "
                        f"quarantine to skip bad rows)")

    def detect(self, rows: list) -> None:
        """Decide the layout from the first batch (its first 200 rows, columns mapped)."""
        if self.layout is None:
            cols = self.cfg.columns
            self.layout = detect_layout([map_columns(r, cols) for r in rows[:200]] if cols else rows,
                                        self.cfg.format, self.cfg.min_score_margin)

    def batch(self, rows: list, indices=None, prepared: PreparedBatch | None = None,
              lines: bool = False) -> None:
        """Validate one batch; ``indices`` are the rows' positions in the source (default: running).

        ``prepared``: the batch already parsed and tokenized by a worker
        (:mod:`~data_contracts.validation.workers`); only the stateful part (duplicates across
        batches, counts, writing) runs here, in source order.
        ``lines``: ``rows`` are undecoded JSON lines (``(number, line)``), with ``prepared`` only.
        """
        cfg, base = self.cfg, self.rows_in
        idx = indices if indices is not None else range(base, base + len(rows))
        self.detect(rows)
        self.rows_in += len(rows)
        if prepared is None:
            bad, parsed = parse_rows(rows, idx, self.layout, cfg.columns, cfg.text_char_limit, self.image_store)
        else:
            bad, parsed = prepared.bad, prepared.parsed

        def raw_of(k: int) -> Any:  # the (column-mapped) raw row of parsed[k]
            off, _, _, raw, _ = parsed[k]
            if raw is None and prepared is not None:
                raw = decode_line(*rows[off]) if lines else rows[off]
                raw = map_columns(raw, cfg.columns) if cfg.columns else raw
            return raw

        keys = np.array([int(eid, 16) for _, _, eid, _, _ in parsed], dtype=np.uint64)
        earlier = self.seen.lookup(keys)
        todo: list[int] = []  # positions in parsed of the rows to keep (if they encode)
        pending: dict[str, int] = {}
        dups: list[tuple[int, int | None, int | None]] = []  # (parsed position, kept row, todo slot)
        for k, ((_, _, eid, _, _), prev) in enumerate(zip(parsed, earlier.tolist())):
            if prev >= 0:
                dups.append((k, prev, None))
            elif eid in pending:
                dups.append((k, None, pending[eid]))
            else:
                pending[eid] = len(todo)
                todo.append(k)

        if prepared is None:
            status, table, truncs = encode_rows([parsed[k] for k in todo], self.tok, cfg, self.vision)
        else:  # the worker encoded every first occurrence in the batch: a superset of todo
            status = [prepared.status[parsed[k][1]] for k in todo]
            table, truncs = prepared.table, prepared.truncated
        positions: list[int] = []
        kept: list[tuple[int, str, int]] = []  # (source index, example id, tokens truncated)
        for k, st in zip(todo, status):
            _, i, eid, _, _ = parsed[k]
            if isinstance(st, RowError):
                bad.append((i, st, raw_of(k)))
            else:
                positions.append(st)
                kept.append((i, eid, truncs[st]))
        dup_rejects = []
        for k, prev, slot in dups:
            i = parsed[k][1]
            if slot is not None and isinstance(status[slot], RowError):
                bad.append((i, status[slot], raw_of(k)))  # same pair as a rejected row: same reason
                continue
            first = prev if slot is None else parsed[todo[slot]][1]
            dup_rejects.append((i, RowError("DUPLICATE_ROW", "<row>", f"same pair as row {first}"),
                                raw_of(k)))

        if bad and cfg.invalid_policy == "fail":
            i, err, _ = min(bad, key=lambda b: b[0])
            self._fail(i, err)
        self._record_rejects(bad, dup_rejects)
        if kept:
            self._record_valid(table.take(pa.array(positions, type=pa.int64())), kept)

    def _record_rejects(self, bad: list, dups: list) -> None:
        for i, err, _ in bad:
            self.counts[err.code] += 1
            self.first_msg.setdefault(err.code, f"row {i} {err.field}: {err.message}"[:500])
        self.rejected += len(bad)
        self.duplicates += len(dups)
        keep = self.cfg.text_char_limit  # a kept raw row holds no more text than a valid field may
        recs = sorted((reject_record(i, err, raw, keep) for i, err, raw in bad + dups),
                      key=lambda r: r["source_index"])
        if recs:
            self.rejects.write(pa.Table.from_pylist(recs, schema=REJECT_SCHEMA))

    def _record_valid(self, table: pa.Table, kept: list[tuple[int, str, int]]) -> None:
        """Append the valid rows ``table`` (source order); ``kept``: (index, example id, truncated)."""
        self.n_valid += len(kept)
        self.seen.add(np.array([int(eid, 16) for _, eid, _ in kept], dtype=np.uint64),
                      np.array([i for i, _, _ in kept], dtype=np.int64))
        self.valid.write(table)
        self.stats.add([eid for _, eid, _ in kept], table["prompt_len"].to_pylist(),
                       table["chosen_len"].to_pylist(), table["rejected_len"].to_pylist(),
                       [t for _, _, t in kept])
        if self.limit is not None:
            seed = self.cfg.shuffle_seed
            for i, eid, truncated in kept:
                item = (-_limit_priority(eid, seed), i, truncated)
                if len(self.heap) < self.limit:
                    heapq.heappush(self.heap, item)
                elif item > self.heap[0]:
                    heapq.heapreplace(self.heap, item)

    def finish_valid(self) -> tuple[int, ValidStats]:
        """Complete the valid file (applying the limit); return (rows written, their stats)."""
        self.valid.close()
        if self.limit is None:
            return self.n_valid, self.stats
        chosen = {i: t for _, i, t in self.heap}
        final = ParquetSink(self.valid_path, VALID_SCHEMA)
        stats = ValidStats()
        try:
            wanted = pa.array(sorted(chosen), type=pa.int64())
            for rb in pq.ParquetFile(self.scratch).iter_batches(batch_size=BATCH_ROWS):
                t = pa.Table.from_batches([rb])
                t = t.filter(pc.is_in(t["source_index"], value_set=wanted))
                if not t.num_rows:
                    continue
                final.write(t)
                idx = t["source_index"].to_pylist()
                stats.add(t["example_id"].to_pylist(), t["prompt_len"].to_pylist(),
                          t["chosen_len"].to_pylist(), t["rejected_len"].to_pylist(),
                          [chosen[i] for i in idx])
        except BaseException:
            final.close_quietly()
            raise
        final.close()
        return stats.rows, stats

    def close(self, failing: bool = False) -> None:
        """Close both files and remove the scratch file; ``failing``: already failing, keep the
        original error."""
        for sink in (self.valid, self.rejects):
            if sink is not None:
                sink.close_quietly() if failing else sink.close()
        if self.scratch is not None:
            self.scratch.unlink(missing_ok=True)


def _batches(source: Any, batch_rows: int, holdout: tuple[float, int, str] | None,
             run: SplitValidation | None = None):
    """(rows, source indices or None for "running") per non-empty batch of the source; counts the
    rows read into ``run.source_rows`` and on ``run.progress``."""
    seen = 0
    for rows in iter_batches(source, batch_rows):
        n = len(rows)
        if run is not None:
            run.source_rows += n
            if run.progress is not None:
                run.progress.read(rows)
        if holdout is None:
            yield rows, None
        else:
            fraction, seed, side = holdout
            picked = [(seen + k, r) for k, r in enumerate(rows)
                      if in_holdout(r, fraction, seed) == (side == "eval")]
            if picked:
                sizes = getattr(rows, "sizes", None)  # for the workers' bounds (readers.Rows)
                yield (Rows([r for _, r in picked], [sizes[k - seen] for k, _ in picked] if sizes else None),
                       [k for k, _ in picked])
        rows = picked = None  # not kept while the next batch is read
        seen += n


def _unindexed(batches, run: SplitValidation):
    for b in batches:
        if run.progress is not None:
            run.progress.read(b, lines=True)
        yield b, None
        b = None  # not kept while the next batch is read


def _feed(run: SplitValidation, source: Any, batch_rows: int, holdout, num_proc: int) -> None:
    """Every batch of the source through ``run``: in this process, or with ``num_proc`` workers."""
    lines = iter_line_batches(source, batch_rows) if num_proc > 1 and holdout is None else None
    if lines is not None:  # JSON lines: the workers decode them too
        run_parallel(run, _unindexed(lines, run), num_proc, lines=True)
    elif num_proc > 1:
        run_parallel(run, _batches(source, batch_rows, holdout, run), num_proc)
    else:
        for rows, idx in _batches(source, batch_rows, holdout, run):
            run.batch(rows, idx)
            rows = idx = None  # not kept while the next batch is read


def _no_rows_message(run: SplitValidation, holdout: tuple[float, int, str] | None) -> str:
    """The one line for a split that got no row at all: an empty source, or a holdout side
    (``data.eval_fraction``) that took none of the source's rows."""
    where = f"data error: {run.split} split of {run.label}"
    if holdout is None or run.source_rows == 0:
        return f"{where}: the source has no rows (0 rows read); check data.source (an empty file?)"
    fraction, _, side = holdout
    if side == "eval":
        return (f"{where}: 0 of the source's {run.source_rows} rows held out for eval "
                f"(data.eval_fraction {fraction}); raise data.eval_fraction, add rows or set "
                f"data.eval_source")
    return (f"{where}: 0 of the source's {run.source_rows} rows left for training after holding out "
            f"data.eval_fraction {fraction}; lower data.eval_fraction or add rows")


def validate_split(source: Any, out_dir: Path, tokenizer, cfg: DataConfig, *, split: str = "train",
                   limit: int | None = None, name: str | None = None,
                   batch_rows: int = BATCH_ROWS,
                   holdout: tuple[float, int, str] | None = None,
                   num_proc: int | None = None, processor=None) -> dict:
    """Check, tokenize and write one split, streaming; return the report dict.

    ``limit`` (default: cfg.train_limit for split "train", else cfg.eval_limit) keeps N valid rows
    chosen by a seeded hash of their example ids (see the module docstring), written in source
    order. ``name`` labels an in-memory source in the report. Raises DataError (unreadable source;
    a bad row under policy ``fail``, no files written) and DataPolicyError (too many rejects under
    ``quarantine``, after the files are written).

    ``holdout=(fraction, seed, side)`` streams only this side ("train" or "eval") of a seeded hash
    split of ``source`` (see :func:`~data_contracts.validation.holdout.split_rows`), keeping source
    row indices.

    ``num_proc`` (default: :func:`resolve_num_proc` of ``cfg.num_proc``): with more than 1, forked
    workers parse and tokenize the batches while this process deduplicates and writes them in
    source order; the files are byte-identical to a serial run.

    ``processor``: the model's processor (a vision-language model): rows with images are checked, their
    images stored under ``out_dir/images/`` and their image tokens expanded
    (:mod:`data_contracts.images`); without one such rows are rejected (IMAGE_NEEDS_VISION_MODEL).
    """
    out_dir = Path(out_dir)
    label = name or describe(source)
    if limit is None:
        limit = cfg.train_limit if split == "train" else cfg.eval_limit
    if tokenizer.eos_token_id is None:
        raise DataError("data error: the tokenizer has no eos_token; set one before validating data")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("valid.parquet", "rejects.parquet"):  # what a killed earlier validation left
        remove_dead_temps(out_dir / name)
    run = SplitValidation(tokenizer, cfg, split, label, limit)
    if processor is not None:
        run.vision = VisionRows(ImageStore(out_dir, base_dir(source), cfg.max_image_bytes, cfg.max_image_pixels),
                                processor)
    num_proc = resolve_num_proc(cfg, source) if num_proc is None else num_proc
    written: list = []  # [rows written, their stats] once the valid file is complete

    def fill(valid_tmp: Path, rejects_tmp: Path) -> None:
        run.open(valid_tmp, rejects_tmp)
        run.progress = SplitProgress(source, split)
        try:
            _feed(run, source, batch_rows, holdout, num_proc)
            if run.rows_in == 0:
                raise DataError(_no_rows_message(run, holdout))
            run.progress.done()
            written.extend(run.finish_valid())
        except BaseException:
            run.close(failing=True)
            raise
        finally:
            run.progress.close()
        run.close()

    # valid.parquet is renamed into place first, then rejects.parquet; on any error neither is
    # (atomic_write removes the temporary files).
    atomic_write(out_dir / "rejects.parquet",
                 lambda rejects_tmp: atomic_write(out_dir / "valid.parquet",
                                                  lambda valid_tmp: fill(valid_tmp, rejects_tmp)))
    n_written, stats = written

    fraction = run.rejected / run.rows_in
    report = build_report(run, tokenizer, n_written, stats)
    report["valid_sha256"] = sha256_file(out_dir / "valid.parquet")  # checked by read_valid
    write_report(out_dir, report)
    if not report["policy_ok"]:
        check_not_empty(report, out_dir, DataPolicyError)  # every row rejected: the empty-split line
        reasons = ", ".join(f"{r['code']} x{r['count']}" for r in report["top_reasons"])
        raise DataPolicyError(f"data error: {split}: {run.rejected}/{run.rows_in} rows rejected "
                              f"({fraction:.1%} > data.max_invalid_fraction "
                              f"{cfg.max_invalid_fraction:.1%}); top reasons: {reasons}; see "
                              f"{out_dir / 'rejects.parquet'}")
    return report
