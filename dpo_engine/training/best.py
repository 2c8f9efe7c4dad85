"""The best checkpoint, as transformers' Trainer picks it (``metric_for_best_model``,
``greater_is_better``, ``load_best_model_at_end``).

A checkpoint is a candidate when its step ran a periodic evaluation (``train.eval_steps``) that
measured the metric; the best is the first candidate with the best value (a strict improvement
replaces it, as transformers' ``np.greater``/``np.less``). It is recorded in every later checkpoint's
``state.json`` (``best``: step, metric, value), so a resumed training goes on with the best so far;
the pruning (``train.save_total_limit``) never deletes it: it counts within the limit, as in
transformers, and the newest checkpoint is always kept too (limit 1: the best and the newest). With
``load_best_model_at_end`` its weights go back into the model once training ends, so the exported
``train/model`` (and what evaluate and register read) is the best checkpoint's.

One difference from transformers: an evaluation at a step without a checkpoint (``save_steps`` a
larger multiple of ``eval_steps``) is not a candidate, since there are no weights to go back to
(transformers then keeps its value as the best to beat but cannot load it).
"""

from __future__ import annotations

import math
from pathlib import Path

from data_contracts.config import TrainConfig
from dpo_engine.training.checkpoints import checkpoint_dirs, load_weights


def best_settings(cfg: TrainConfig) -> tuple[str, bool] | None:
    """(metric, greater is better) of the best-checkpoint selection, or None when off: the metric
    defaults to eval/loss with ``load_best_model_at_end``; the direction to false for a ``*loss``."""
    metric = cfg.metric_for_best_model or ("eval/loss" if cfg.load_best_model_at_end else None)
    if metric is None:
        return None
    return metric, (not metric.endswith("loss") if cfg.greater_is_better is None else cfg.greater_is_better)


class BestCheckpoint:
    """The best checkpoint so far (``record``: step, metric, value, greater_is_better, or None)."""

    def __init__(self, cfg: TrainConfig, ckpt_dir: Path, resumed: dict | None = None,
                 history: list[dict] | None = None):
        self.settings = best_settings(cfg)
        self.load_at_end = cfg.load_best_model_at_end
        self.ckpt_dir = Path(ckpt_dir)
        self.record: dict | None = None
        if self.settings is None:
            return
        metric, greater = self.settings
        if isinstance(resumed, dict) and resumed.get("metric") == metric and resumed.get("greater_is_better") == greater:
            self.record = resumed
        elif history:  # a checkpoint written without the record: its evaluated checkpoints still on disk
            saved = {int(p.name.split("-")[1]) for p in checkpoint_dirs(self.ckpt_dir)}
            for h in history:
                if h.get("step") in saved:
                    self.update(h["step"], h)

    def update(self, step: int, metrics: dict) -> dict | None:
        """At a checkpoint of ``step`` with that step's ``metrics``: the record, replaced when better."""
        if self.settings is None:
            return None
        metric, greater = self.settings
        value = metrics.get(metric)
        if value is None or not math.isfinite(value):
            return self.record
        best = None if self.record is None else self.record["value"]
        if best is None or (value > best if greater else value < best):
            self.record = {"step": int(step), "metric": metric, "value": float(value), "greater_is_better": greater}
        return self.record

    @property
    def step(self) -> int | None:
        return None if self.record is None else self.record["step"]

    def stale(self, keep: int) -> list[Path]:
        """The checkpoints the pruning deletes: all but the newest ``keep``, the best one kept within
        them (the best and the newest ``keep - 1``, at least the newest one)."""
        found = checkpoint_dirs(self.ckpt_dir)  # newest first
        best = [p for p in found if self.step is not None and p.name == f"step-{self.step}"]
        others = [p for p in found if p not in best]
        kept = best + others[:max(1, keep - len(best))]
        return [p for p in found if p not in kept]

    def at_end(self, model) -> dict | None:
        """``load_best_model_at_end``: the best checkpoint's weights (checked against its recorded
        hashes) into ``model``; returns the record with ``loaded`` and ``checkpoint``."""
        if self.record is None:
            return None
        path = self.ckpt_dir / f"step-{self.record['step']}"
        out = {**self.record, "checkpoint": str(path), "loaded": False}
        if self.load_at_end:
            load_weights(path, model)
            out["loaded"] = True
        return out
