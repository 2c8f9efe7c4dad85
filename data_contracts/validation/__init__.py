"""Validate one split: stream, check row by row, tokenize in batches, write valid/rejects/report.

Every input row ends up in exactly one bucket, so ``rows_in = valid + rejected + duplicates +
limited_out``. Files written into out_dir (each via a temporary file and ``os.replace``):

- ``valid.parquet``: the contract the engine reads (VALID_SCHEMA).
- ``rejects.parquet``: source_index, code, field, message, raw (JSON of the raw row); duplicates
  are listed there too with code DUPLICATE_ROW.
- ``report.json`` and ``summary.md``: counts, reasons, length stats, fingerprint, policy verdict.

Streaming: rows come from :func:`sources.iter_batches` one batch (``batch_rows``) at a time, are
checked, deduplicated, tokenized with one tokenizer call per batch and appended to the parquet files
with ``pq.ParquetWriter``, so memory does not grow with the raw data. With ``num_proc`` > 1
(``data.num_proc``; auto: only for large inputs) forked workers parse, check and tokenize the
batches (JSON lines files: decode them too) while this process deduplicates and writes them in
source order, at most 2 x num_proc batches in flight; the output is byte-identical to a serial
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
import json
import math
import multiprocessing as mp
import os
from array import array
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_contracts.config import BUILTIN_DATASET, DataConfig
from data_contracts.encode import Encoded, encode_batch
from data_contracts.errors import DataError, DataPolicyError
from data_contracts.layouts import Example, RowError, detect_layout, map_columns, to_example
from data_contracts.sources import (BATCH_ROWS, decode_line, describe, input_size, iter_batches,
                                   iter_line_batches, load_rows)

_ids = pa.list_(pa.int32())
VALID_SCHEMA = pa.schema([
    ("example_id", pa.string()), ("source_index", pa.int64()),
    ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
    ("is_conversational", pa.bool_()), ("tools", pa.string()), ("chat_template_kwargs", pa.string()),
    ("meta", pa.string()),
    ("prompt_input_ids", _ids), ("chosen_input_ids", _ids), ("rejected_input_ids", _ids),
    ("prompt_len", pa.int32()), ("chosen_len", pa.int32()), ("rejected_len", pa.int32()),
])
REJECT_SCHEMA = pa.schema([("source_index", pa.int64()), ("code", pa.string()),
                           ("field", pa.string()), ("message", pa.string()), ("raw", pa.string())])


_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)
_ID_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str, sort_keys=True, separators=(",", ":"))


_str_json = json.encoder.encode_basestring  # what both encoders write for a str (ensure_ascii=False)


def _json(x: Any, **kw) -> str:
    if not kw:
        return _ENCODER.encode(x)  # a prebuilt encoder: json.dumps(x, **kw) builds one per call
    return json.dumps(x, ensure_ascii=False, default=str, **kw)


def example_id(ex: Example) -> str:
    """16 hex chars of sha256 over the canonical prompt/chosen/rejected JSON (+ tools and the row's
    chat_template_kwargs when set)."""
    if not ex.tools and not ex.template_kwargs and ex.prompt.__class__ is ex.chosen.__class__ is ex.rejected.__class__ is str:
        # the same text as the encoder's, without building and walking a dict
        text = (f'{{"chosen":{_str_json(ex.chosen)},"prompt":{_str_json(ex.prompt)},'
                f'"rejected":{_str_json(ex.rejected)}}}')
        return hashlib.sha256(text.encode()).hexdigest()[:16]
    key = {"chosen": ex.chosen, "prompt": ex.prompt, "rejected": ex.rejected}
    if ex.tools:
        key["tools"] = ex.tools
    if ex.template_kwargs:
        key["chat_template_kwargs"] = ex.template_kwargs
    return hashlib.sha256(_ID_ENCODER.encode(key).encode()).hexdigest()[:16]


def _utf8_safe(s: str) -> str:
    """``s`` with lone surrogates (valid JSON escapes, not UTF-8) written as backslash escapes."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_texts(ex: Example, max_chars: int) -> None:
    """Reject a text Parquet cannot store (lone surrogates from JSON escapes like \\ud800), and one
    longer than ``max_chars`` characters before it is tokenized (tokenizing an absurdly long text
    costs memory in proportion to it: an 8 MB text took 4 GB). One JSON rendering per structured
    field serves both checks."""
    for name in ("prompt", "chosen", "rejected", "tools", "template_kwargs", "meta"):
        value = getattr(ex, name)
        if not value:
            continue
        text = value if value.__class__ is str else _json(value)
        if len(text) > max_chars and name in ("prompt", "chosen", "rejected", "tools"):
            raise RowError("TEXT_TOO_LONG", name, f"'{name}' has {len(text):,} characters, more than "
                           f"data.max_text_chars ({max_chars:,}); raise it or shorten the row")
        if not text.isascii():  # ASCII: always encodable
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RowError("INVALID_UNICODE", name, f"not encodable as UTF-8 ({e.reason} at "
                               f"position {e.start})") from None


RAW_KEPT = 1_000_000  # characters of a rejected row kept in rejects.parquet


def _reject(index: int, err: RowError, raw: Any) -> dict:
    try:
        text = _json(raw)
    except (ValueError, RecursionError, TypeError):
        text = repr(raw)[:10000]
    if len(text) > RAW_KEPT:  # bounded: the row is still named by source_index and code
        text = text[:RAW_KEPT] + f"...[cut: {len(text):,} characters in all]"
    return {"source_index": index, "code": err.code, "field": _utf8_safe(str(err.field)),
            "message": _utf8_safe(str(err.message)), "raw": _utf8_safe(text)}


def _as_row_error(e: Exception) -> RowError:
    return e if isinstance(e, RowError) else RowError("MALFORMED", "<row>",
                                                      f"{type(e).__name__}: {e}"[:300])


def _stats(xs) -> dict:
    if len(xs) == 0:
        return {"min": 0, "mean": 0.0, "max": 0, "p95": 0}
    s = np.sort(np.asarray(xs, dtype=np.int64))
    return {"min": int(s[0]), "mean": round(float(s.mean()), 2), "max": int(s[-1]),
            "p95": int(s[max(0, math.ceil(0.95 * len(s)) - 1)])}


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _summary(rep: dict) -> str:
    lines = [f"# Data report: {rep['split']}", "", f"source: `{rep['source']}` (layout {rep['layout']}, "
             f"{'conversational' if rep['is_conversational'] else 'standard'})", "",
             "| rows in | valid | rejected | duplicates | limited out | invalid fraction | policy ok |",
             "|---|---|---|---|---|---|---|",
             f"| {rep['rows_in']} | {rep['valid']} | {rep['rejected']} | {rep['duplicates']} | "
             f"{rep['limited_out']} | {rep['invalid_fraction']:.4f} | {rep['policy_ok']} |", ""]
    if rep["top_reasons"]:
        lines += ["Top reject reasons:", ""] + [f"- {r['code']} x{r['count']}: {r['example']}"
                                               for r in rep["top_reasons"]] + [""]
    lines += ["| tokens | min | mean | p95 | max |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['min']} | {v['mean']} | {v['p95']} | {v['max']} |"
              for k, v in rep["lengths"].items()]
    lines += ["", f"truncated: {rep['truncated']['rows']} rows, {rep['truncated']['tokens']} tokens; "
              f"fingerprint `{rep['fingerprint'][:16]}`", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- streaming

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


class _Stats:
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
        return {"lengths": {k: _stats(v) for k, v in self.lens.items()},
                "truncated": {"rows": self.truncated_rows, "tokens": self.truncated_tokens},
                "fingerprint": self.fp.hexdigest()}


class _Writer:
    """A parquet file written batch by batch into a temporary name, renamed on commit."""

    def __init__(self, path: Path, schema: pa.Schema, tag: str = ""):
        self.path, self.schema = path, schema
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}{tag}.tmp")
        self.writer = pq.ParquetWriter(self.tmp, schema)

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def commit(self) -> None:
        self.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.close()
        except Exception:  # already failing: only clean up
            pass
        self.tmp.unlink(missing_ok=True)


def _valid_table(recs: list[tuple[int, Example, str, Encoded]]) -> pa.Table:
    js = lambda x: _str_json(x) if x.__class__ is str else _json(x)  # noqa: E731
    encs = [enc for *_, enc in recs]
    exs = [ex for _, ex, _, _ in recs]
    cols = {
        "example_id": [eid for _, _, eid, _ in recs], "source_index": [i for i, *_ in recs],
        "prompt": [js(ex.prompt) for ex in exs], "chosen": [js(ex.chosen) for ex in exs],
        "rejected": [js(ex.rejected) for ex in exs],
        "is_conversational": [ex.is_conversational for ex in exs],
        "tools": [_json(ex.tools) if ex.tools else None for ex in exs],
        "chat_template_kwargs": [_json(ex.template_kwargs) if ex.template_kwargs else None for ex in exs],
        "meta": [_json(ex.meta) if ex.meta else "{}" for ex in exs],
        "prompt_input_ids": [e.prompt for e in encs], "chosen_input_ids": [e.chosen for e in encs],
        "rejected_input_ids": [e.rejected for e in encs],
        "prompt_len": [len(e.prompt) for e in encs], "chosen_len": [len(e.chosen) for e in encs],
        "rejected_len": [len(e.rejected) for e in encs],
    }
    return pa.Table.from_pydict(cols, schema=VALID_SCHEMA)


def _parse(rows: list, idx, layout, columns: dict, max_chars: int) -> tuple[list, list]:
    """(bad, parsed): bad = [(index, RowError, raw)], parsed = [(offset, index, example id, raw,
    Example)] in source order (raw after column mapping)."""
    bad: list[tuple[int, RowError, Any]] = []
    parsed: list[tuple[int, int, str, Any, Example]] = []
    for off, raw in enumerate(rows):
        if columns:
            raw = map_columns(raw, columns)
        try:
            ex = to_example(raw, layout)
            _check_texts(ex, max_chars)
            parsed.append((off, idx[off], example_id(ex), raw, ex))
        except Exception as e:  # a malformed row never stops the run under quarantine
            bad.append((idx[off], _as_row_error(e), raw))
    return bad, parsed


def _encode(examples: list[Example], tok, cfg: DataConfig) -> list:
    try:
        return encode_batch(examples, tok, cfg.max_length, cfg.truncation_mode, cfg.chat_template_kwargs)
    except Exception:  # one bad row broke the batch call: isolate it
        out = []
        for ex in examples:
            try:
                out += encode_batch([ex], tok, cfg.max_length, cfg.truncation_mode, cfg.chat_template_kwargs)
            except Exception as e:
                out.append(_as_row_error(e))
        return out


def _encode_table(todo: list, tok, cfg: DataConfig) -> tuple[list, pa.Table | None, list[int]]:
    """Tokenize parsed rows (see :func:`_parse`): (status, table, truncated). ``status[k]`` is the
    row's position in ``table`` (VALID_SCHEMA) or its RowError; ``truncated[p]``: tokens cut from
    table row p."""
    encs = _encode([ex for *_, ex in todo], tok, cfg)
    status: list = []
    recs: list[tuple[int, Example, str, Encoded]] = []
    for (_, i, eid, _, ex), enc in zip(todo, encs):
        if isinstance(enc, RowError):
            status.append(enc)
        else:
            status.append(len(recs))
            recs.append((i, ex, eid, enc))
    return status, (_valid_table(recs) if recs else None), [enc.truncated for *_, enc in recs]


# ------------------------------------------------------------------------------------- workers

@dataclass
class _Prepared:
    """One batch parsed and tokenized by a worker: what :meth:`_Run.batch` needs from it."""
    bad: list  # [(index, RowError, raw)]
    parsed: list  # [(offset, index, example id, None, None)]: the parent holds the raw rows
    status: dict  # index -> table position or RowError, for each first occurrence in the batch
    table: pa.Table | None
    truncated: list


_WORKER: tuple | None = None  # (layout, cfg, tokenizer), set before the fork


def _work(rows: list, idx, lines: bool) -> _Prepared:
    """Parse and tokenize one batch in a worker process (each example id once per batch);
    ``lines``: the rows are undecoded JSON lines."""
    layout, cfg, tok = _WORKER
    if lines:
        rows = [decode_line(n, line) for n, line in rows]
    bad, parsed = _parse(rows, idx, layout, cfg.columns, cfg.text_char_limit)
    first: set[str] = set()
    todo = []
    for p in parsed:
        if p[2] not in first:
            first.add(p[2])
            todo.append(p)
    status, table, truncated = _encode_table(todo, tok, cfg)
    return _Prepared(bad, [(off, i, eid, None, None) for off, i, eid, _, _ in parsed],
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


def _finish_batch(run: "_Run", lines: bool, rows: list, idx, fut) -> None:
    try:
        prepared = fut.result() if fut is not None else None
    except Exception:  # a row too deeply nested to pickle, a worker that died: do it here
        prepared = None
    if prepared is None:
        run.batch([decode_line(n, line) for n, line in rows] if lines else rows, idx)
    else:
        run.batch(rows, idx, prepared, lines)


def _run_parallel(run: "_Run", batches, n: int, lines: bool = False) -> None:
    """Batches to ``n`` forked workers (they see the run's layout, config and tokenizer), results
    consumed in source order, at most 2n batches in flight. A batch whose worker fails for any
    reason (a pool broken by a killed worker included) is done in this process instead: same
    output, never a hang. ``lines``: the batches are undecoded JSON lines
    (:func:`sources.iter_line_batches`)."""
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


def _limit_priority(eid: str, seed: int) -> int:
    key = seed.to_bytes(8, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(eid.encode(), digest_size=8, key=key).digest(), "big")


class _Run:
    """The state of one validate_split call."""

    def __init__(self, out_dir: Path, tok, cfg: DataConfig, split: str, label: str, limit: int | None):
        self.tok, self.cfg, self.split, self.label, self.limit = tok, cfg, split, label, limit
        self.layout = None
        self.rows_in = self.n_valid = self.rejected = self.duplicates = 0
        self.counts: Counter = Counter()
        self.first_msg: dict[str, str] = {}
        self.seen = SeenIds()
        self.stats = _Stats()
        self.heap: list[tuple[int, int, int]] = []  # (-priority, source_index, truncated), limit only
        self.valid = _Writer(out_dir / "valid.parquet", VALID_SCHEMA, ".all" if limit else "")
        self.rejects = _Writer(out_dir / "rejects.parquet", REJECT_SCHEMA)

    def _fail(self, i: int, err: RowError) -> None:
        raise DataError(f"data error: {self.split} row {i} of {self.label}: {err.code} in field "
                        f"'{err.field}': {err.message} (data.invalid_policy=fail; use "
                        f"quarantine to skip bad rows)")

    def detect(self, rows: list) -> None:
        """Decide the layout from the first batch (its first 200 rows, columns mapped)."""
        if self.layout is None:
            cols = self.cfg.columns
            self.layout = detect_layout([map_columns(r, cols) for r in rows[:200]] if cols else rows,
                                        self.cfg.format)

    def batch(self, rows: list, indices=None, prepared: "_Prepared | None" = None,
              lines: bool = False) -> None:
        """Validate one batch; ``indices`` are the rows' positions in the source (default: running).

        ``prepared``: the batch already parsed and tokenized by a worker (:func:`_work`); only the
        stateful part (duplicates across batches, counts, writing) runs here, in source order.
        ``lines``: ``rows`` are undecoded JSON lines (``(number, line)``), with ``prepared`` only.
        """
        cfg, base = self.cfg, self.rows_in
        idx = indices if indices is not None else range(base, base + len(rows))
        self.detect(rows)
        self.rows_in += len(rows)
        if prepared is None:
            bad, parsed = _parse(rows, idx, self.layout, cfg.columns, cfg.text_char_limit)
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
            status, table, truncs = _encode_table([parsed[k] for k in todo], self.tok, cfg)
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
            self.first_msg.setdefault(err.code, f"row {i} {err.field}: {err.message}")
        self.rejected += len(bad)
        self.duplicates += len(dups)
        recs = sorted((_reject(i, err, raw) for i, err, raw in bad + dups),
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

    def finish_valid(self) -> tuple[int, _Stats]:
        """Commit valid.parquet (applying the limit); return (rows written, their stats)."""
        if self.limit is None:
            self.valid.commit()
            return self.n_valid, self.stats
        self.valid.close()
        chosen = {i: t for _, i, t in self.heap}
        final = _Writer(self.valid.path, VALID_SCHEMA)
        stats = _Stats()
        try:
            wanted = pa.array(sorted(chosen), type=pa.int64())
            for rb in pq.ParquetFile(self.valid.tmp).iter_batches(batch_size=BATCH_ROWS):
                t = pa.Table.from_batches([rb])
                t = t.filter(pc.is_in(t["source_index"], value_set=wanted))
                if not t.num_rows:
                    continue
                final.write(t)
                idx = t["source_index"].to_pylist()
                stats.add(t["example_id"].to_pylist(), t["prompt_len"].to_pylist(),
                          t["chosen_len"].to_pylist(), t["rejected_len"].to_pylist(),
                          [chosen[i] for i in idx])
            final.commit()
        except BaseException:
            final.abort()
            raise
        finally:
            self.valid.abort()  # the unlimited temporary file
        return stats.rows, stats

    def abort(self) -> None:
        self.valid.abort()
        self.rejects.abort()


def _batches(source: Any, batch_rows: int, holdout: tuple[float, int, str] | None):
    """(rows, source indices or None for "running") per non-empty batch of the source."""
    seen = 0
    for rows in iter_batches(source, batch_rows):
        if holdout is None:
            yield rows, None
        else:
            fraction, seed, side = holdout
            picked = [(seen + k, r) for k, r in enumerate(rows)
                      if in_holdout(r, fraction, seed) == (side == "eval")]
            if picked:
                yield [r for _, r in picked], [k for k, _ in picked]
        seen += len(rows)


def validate_split(source: Any, out_dir: Path, tokenizer, cfg: DataConfig, *, split: str = "train",
                   limit: int | None = None, name: str | None = None,
                   batch_rows: int = BATCH_ROWS,
                   holdout: tuple[float, int, str] | None = None,
                   num_proc: int | None = None) -> dict:
    """Check, tokenize and write one split, streaming; return the report dict.

    ``limit`` (default: cfg.train_limit for split "train", else cfg.eval_limit) keeps N valid rows
    chosen by a seeded hash of their example ids (see the module docstring), written in source
    order. ``name`` labels an in-memory source in the report. Raises DataError (unreadable source;
    a bad row under policy ``fail``, no files written) and DataPolicyError (too many rejects under
    ``quarantine``, after the files are written).

    ``holdout=(fraction, seed, side)`` streams only this side ("train" or "eval") of a seeded hash
    split of ``source`` (see :func:`split_rows`), keeping source row indices.

    ``num_proc`` (default: :func:`resolve_num_proc` of ``cfg.num_proc``): with more than 1, forked
    workers parse and tokenize the batches while this process deduplicates and writes them in
    source order; the files are byte-identical to a serial run.
    """
    out_dir = Path(out_dir)
    label = name or describe(source)
    if limit is None:
        limit = cfg.train_limit if split == "train" else cfg.eval_limit
    if tokenizer.eos_token_id is None:
        raise DataError("data error: the tokenizer has no eos_token; set one before validating data")
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(out_dir, tokenizer, cfg, split, label, limit)
    num_proc = resolve_num_proc(cfg, source) if num_proc is None else num_proc
    try:
        lines = iter_line_batches(source, batch_rows) if num_proc > 1 and holdout is None else None
        if lines is not None:  # JSON lines: the workers decode them too
            _run_parallel(run, ((b, None) for b in lines), num_proc, lines=True)
        elif num_proc > 1:
            _run_parallel(run, _batches(source, batch_rows, holdout), num_proc)
        else:
            for rows, idx in _batches(source, batch_rows, holdout):
                run.batch(rows, idx)
        if run.rows_in == 0:
            raise DataError(f"data error: {label}: no rows; check data.source")
        n_written, stats = run.finish_valid()
        run.rejects.commit()
    except BaseException:
        run.abort()
        raise

    fraction = run.rejected / run.rows_in
    layout = run.layout
    report = {
        "split": split, "source": label, "layout": layout.name,
        "is_conversational": layout.conversational, "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "rows_in": run.rows_in, "valid": n_written, "rejected": run.rejected,
        "duplicates": run.duplicates, "limited_out": run.n_valid - n_written,
        "reject_counts": dict(run.counts.most_common()),
        **stats.report(),
        "max_length": cfg.max_length, "truncation_mode": cfg.truncation_mode,
        "invalid_fraction": round(fraction, 6), "max_invalid_fraction": cfg.max_invalid_fraction,
        "policy": cfg.invalid_policy, "policy_ok": fraction <= cfg.max_invalid_fraction,
        "top_reasons": [{"code": c, "count": n, "example": run.first_msg[c][:200]}
                        for c, n in run.counts.most_common(3)],
    }
    report = {k: report[k] for k in _REPORT_ORDER}
    assert report["rows_in"] == n_written + run.rejected + run.duplicates + report["limited_out"]

    _write_atomic(out_dir / "summary.md", lambda p: p.write_text(_summary(report)))
    _write_atomic(out_dir / "report.json", lambda p: p.write_text(json.dumps(report, indent=2)))

    if not report["policy_ok"]:
        reasons = ", ".join(f"{r['code']} x{r['count']}" for r in report["top_reasons"])
        raise DataPolicyError(f"data error: {split}: {run.rejected}/{run.rows_in} rows rejected "
                              f"({fraction:.1%} > data.max_invalid_fraction "
                              f"{cfg.max_invalid_fraction:.1%}); top reasons: {reasons}; see "
                              f"{out_dir / 'rejects.parquet'}")
    return report


_REPORT_ORDER = ("split", "source", "layout", "is_conversational", "tokenizer", "rows_in", "valid",
                 "rejected", "duplicates", "limited_out", "reject_counts", "lengths", "truncated",
                 "max_length", "truncation_mode", "fingerprint", "invalid_fraction",
                 "max_invalid_fraction", "policy", "policy_ok", "top_reasons")


# ------------------------------------------------------------------------------------- splits

def _split_key(row: Any) -> str:
    if isinstance(row, dict):
        for k in ("prompt", "conversations"):
            if k in row:
                return _json(row[k], sort_keys=True)
    return _json(row, sort_keys=True)


def split_rows(rows: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, eval) by a seeded hash of each row's prompt (the whole row when it has none).

    Deterministic, order-preserving, independent of row order, and rows sharing a prompt land on
    the same side. About ``fraction`` of the rows go to eval.
    """
    train, held = [], []
    for row in rows:
        (held if in_holdout(row, fraction, seed) else train).append(row)
    return train, held


def in_holdout(row: Any, fraction: float, seed: int = 0) -> bool:
    """Whether a raw row falls in the held-out share (a seeded hash of its prompt)."""
    h = hashlib.sha256(f"{seed}\0{_split_key(row)}".encode()).hexdigest()
    return int(h[:15], 16) / 16 ** 15 < fraction


def plan_splits(cfg: DataConfig) -> dict[str, tuple[Any, str] | None]:
    """Where each split comes from: {"train": (source, name), "eval": (source, name) or None}.

    eval_source when given; the builtin eval split for the builtin dataset; else a hash split of
    source by eval_fraction (None when eval_fraction is 0).
    """
    if cfg.eval_source is not None:
        return {"train": (cfg.source, cfg.source), "eval": (cfg.eval_source, cfg.eval_source)}
    if cfg.source.split("@")[0] == BUILTIN_DATASET:
        return {"train": (cfg.source, cfg.source), "eval": (f"{BUILTIN_DATASET}@eval",) * 2}
    if cfg.eval_fraction == 0:
        return {"train": (cfg.source, cfg.source), "eval": None}
    train, held = split_rows(load_rows(cfg.source), cfg.eval_fraction, cfg.shuffle_seed)
    share = f"eval_fraction={cfg.eval_fraction}, seed={cfg.shuffle_seed}"
    return {"train": (train, f"{cfg.source} (train share, {share})"),
            "eval": (held, f"{cfg.source} (eval share, {share})")}


def read_valid(path: str | Path):
    """An earlier stage's ``valid.parquet`` as a DataFrame; a damaged or missing file is a one-line
    DataError naming it (re-run validate), not a pyarrow traceback."""
    import pandas as pd  # lazy: only readers of valid.parquet need pandas

    try:
        return pd.read_parquet(path)
    except (OSError, pa.ArrowException, ValueError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data error: {path} is missing or not a readable Parquet file ({why}); "
                        f"re-run the validate stage to rebuild it") from None
