"""Held-out splits: a seeded hash of each row's prompt decides train or eval, and
:func:`plan_splits` says where each split of a run comes from."""

from __future__ import annotations

import hashlib
from typing import Any

from data_contracts.config import BUILTIN_DATASET, DataConfig
from data_contracts.sources import load_rows
from data_contracts.validation.rows import to_json


def _split_key(row: Any) -> str:
    if isinstance(row, dict):
        for k in ("prompt", "conversations"):
            if k in row:
                return to_json(row[k], sort_keys=True)
    return to_json(row, sort_keys=True)


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
    # surrogatepass: a lone surrogate (a valid JSON escape) is hashed, not a crash; other text as UTF-8
    h = hashlib.sha256(f"{seed}\0{_split_key(row)}".encode("utf-8", "surrogatepass")).hexdigest()
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
