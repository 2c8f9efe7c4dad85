"""Validate one split: load, check row by row, tokenize, write valid/rejects/report atomically.

Every input row ends up in exactly one bucket, so ``rows_in = valid + rejected + duplicates +
limited_out``. Files written into out_dir (each via a temporary file and ``os.replace``):

- ``valid.parquet``: the contract the engine reads (VALID_SCHEMA).
- ``rejects.parquet``: source_index, code, field, message, raw (JSON of the raw row); duplicates
  are listed there too with code DUPLICATE_ROW.
- ``report.json`` and ``summary.md``: counts, reasons, length stats, fingerprint, policy verdict.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.config import BUILTIN_DATASET, DataConfig
from data_contracts.encode import encode
from data_contracts.errors import DataError, DataPolicyError
from data_contracts.formats import Example, RowError, detect_layout, to_example
from data_contracts.sources import describe, load_rows

_ids = pa.list_(pa.int32())
VALID_SCHEMA = pa.schema([
    ("example_id", pa.string()), ("source_index", pa.int64()),
    ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
    ("is_conversational", pa.bool_()), ("tools", pa.string()), ("meta", pa.string()),
    ("prompt_input_ids", _ids), ("chosen_input_ids", _ids), ("rejected_input_ids", _ids),
    ("prompt_len", pa.int32()), ("chosen_len", pa.int32()), ("rejected_len", pa.int32()),
])
REJECT_SCHEMA = pa.schema([("source_index", pa.int64()), ("code", pa.string()),
                           ("field", pa.string()), ("message", pa.string()), ("raw", pa.string())])


def _json(x: Any, **kw) -> str:
    return json.dumps(x, ensure_ascii=False, default=str, **kw)


def example_id(ex: Example) -> str:
    """16 hex chars of sha256 over the canonical prompt/chosen/rejected JSON (+ tools when set)."""
    key = {"prompt": ex.prompt, "chosen": ex.chosen, "rejected": ex.rejected}
    if ex.tools:
        key["tools"] = ex.tools
    return hashlib.sha256(_json(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _reject(index: int, err: RowError, raw: Any) -> dict:
    return {"source_index": index, "code": err.code, "field": err.field, "message": err.message,
            "raw": _json(raw)}


def _stats(xs: list[int]) -> dict:
    if not xs:
        return {"min": 0, "mean": 0.0, "max": 0, "p95": 0}
    s = sorted(xs)
    return {"min": s[0], "mean": round(sum(s) / len(s), 2), "max": s[-1],
            "p95": s[max(0, math.ceil(0.95 * len(s)) - 1)]}


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


def validate_split(source: Any, out_dir: Path, tokenizer, cfg: DataConfig, *, split: str = "train",
                   limit: int | None = None, name: str | None = None) -> dict:
    """Check, tokenize and write one split; return the report dict.

    ``limit`` (default: cfg.train_limit for split "train", else cfg.eval_limit) keeps N valid rows
    chosen by a cfg.shuffle_seed shuffle (written in source order). ``name`` labels an in-memory
    source in the report. Raises DataError (unreadable source; a bad row under policy ``fail``) and
    DataPolicyError (too many rejects under ``quarantine``, after the files are written).
    """
    out_dir = Path(out_dir)
    label = name or describe(source)
    if limit is None:
        limit = cfg.train_limit if split == "train" else cfg.eval_limit
    if tokenizer.eos_token_id is None:
        raise DataError("data error: the tokenizer has no eos_token; set one before validating data")
    rows = load_rows(source)
    if not rows:
        raise DataError(f"data error: {label}: no rows; check data.source")
    layout = detect_layout(rows, cfg.format)

    kept: list[tuple[dict, int]] = []  # (record, tokens truncated)
    rejects: list[dict] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(rows):
        try:
            ex = to_example(raw, layout)
            eid = example_id(ex)
            if eid in seen:
                rejects.append(_reject(i, RowError("DUPLICATE_ROW", "<row>",
                                                   f"same pair as row {seen[eid]}"), raw))
                continue
            enc = encode(ex, tokenizer, cfg.max_length, cfg.truncation_mode)
        except Exception as e:  # a malformed row never stops the run under quarantine
            err = e if isinstance(e, RowError) else RowError("MALFORMED", "<row>",
                                                             f"{type(e).__name__}: {e}"[:300])
            if cfg.invalid_policy == "fail":
                raise DataError(f"data error: {split} row {i} of {label}: {err.code} in field "
                                f"'{err.field}': {err.message} (data.invalid_policy=fail; use "
                                f"quarantine to skip bad rows)") from None
            rejects.append(_reject(i, err, raw))
            continue
        seen[eid] = i
        kept.append(({
            "example_id": eid, "source_index": i,
            "prompt": _json(ex.prompt), "chosen": _json(ex.chosen), "rejected": _json(ex.rejected),
            "is_conversational": ex.is_conversational,
            "tools": _json(ex.tools) if ex.tools else None, "meta": _json(ex.meta),
            "prompt_input_ids": enc.prompt, "chosen_input_ids": enc.chosen,
            "rejected_input_ids": enc.rejected,
            "prompt_len": len(enc.prompt), "chosen_len": len(enc.chosen),
            "rejected_len": len(enc.rejected)}, enc.truncated))

    n_valid = len(kept)
    if limit is not None and n_valid > limit:
        order = list(range(n_valid))
        random.Random(cfg.shuffle_seed).shuffle(order)
        kept = [kept[j] for j in sorted(order[:limit])]
    valid = [rec for rec, _ in kept]

    duplicates = sum(r["code"] == "DUPLICATE_ROW" for r in rejects)
    counts = Counter(r["code"] for r in rejects if r["code"] != "DUPLICATE_ROW")
    first_msg = {}
    for r in rejects:
        first_msg.setdefault(r["code"], f"row {r['source_index']} {r['field']}: {r['message']}")
    rejected = sum(counts.values())
    fraction = rejected / len(rows)
    report = {
        "split": split, "source": label, "layout": layout.name,
        "is_conversational": layout.conversational, "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "rows_in": len(rows), "valid": len(valid), "rejected": rejected, "duplicates": duplicates,
        "limited_out": n_valid - len(valid), "reject_counts": dict(counts.most_common()),
        "lengths": {k: _stats([r[f"{k}_len"] for r in valid]) for k in ("prompt", "chosen", "rejected")},
        "truncated": {"rows": sum(t > 0 for _, t in kept), "tokens": sum(t for _, t in kept)},
        "max_length": cfg.max_length, "truncation_mode": cfg.truncation_mode,
        "fingerprint": hashlib.sha256("\n".join(r["example_id"] for r in valid).encode()).hexdigest(),
        "invalid_fraction": round(fraction, 6), "max_invalid_fraction": cfg.max_invalid_fraction,
        "policy": cfg.invalid_policy, "policy_ok": fraction <= cfg.max_invalid_fraction,
        "top_reasons": [{"code": c, "count": n, "example": first_msg[c][:200]}
                        for c, n in counts.most_common(3)],
    }
    assert report["rows_in"] == len(valid) + rejected + duplicates + report["limited_out"]

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "valid.parquet", lambda p: pq.write_table(
        pa.Table.from_pylist(valid, schema=VALID_SCHEMA), p))
    _write_atomic(out_dir / "rejects.parquet", lambda p: pq.write_table(
        pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), p))
    _write_atomic(out_dir / "summary.md", lambda p: p.write_text(_summary(report)))
    _write_atomic(out_dir / "report.json", lambda p: p.write_text(json.dumps(report, indent=2)))

    if not report["policy_ok"]:
        reasons = ", ".join(f"{r['code']} x{r['count']}" for r in report["top_reasons"])
        raise DataPolicyError(f"data error: {split}: {rejected}/{len(rows)} rows rejected "
                              f"({fraction:.1%} > data.max_invalid_fraction "
                              f"{cfg.max_invalid_fraction:.1%}); top reasons: {reasons}; see "
                              f"{out_dir / 'rejects.parquet'}")
    return report


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
        h = hashlib.sha256(f"{seed}\0{_split_key(row)}".encode()).hexdigest()
        (held if int(h[:15], 16) / 16 ** 15 < fraction else train).append(row)
    return train, held


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
