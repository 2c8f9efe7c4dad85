"""A sweep: variants of one config (a grid of values, or a list of overrides), each trained and evaluated, the best one registered.

The flow (``flows/sweep.py``) validates the data once, precomputes once per distinct reference
cache key, and trains/evaluates every variant as a child MLflow run under one parent run.

Early stop of a lagging variant: with a stop margin, every variant posts its periodic eval metric
(``train.eval_steps``) to a shared *board* (``board.json`` in the sweep folder: variant -> step ->
value and the decision taken there, rewritten atomically under a file lock, so parallel variants
never lose a post) and stops when it is behind the best value any variant reached at the same step
by more than the margin.
The rule reaches the train stage through ``sweep_stop.json`` in the variant's run folder
(``stop_rule``), so it also works for retried tasks and process workers.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import math
import os
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from data_contracts.config import EVAL_STEP_METRICS, ConfigError, RunConfig

from data_contracts.state import mlflow_uri

# Sections a variant may change: validation (data, model) is shared by all variants.
SWEEPABLE = ("loss", "train", "eval", "reference")


def _check_key(key: str) -> None:
    if not isinstance(key, str) or key.split(".", 1)[0] not in SWEEPABLE:
        raise ConfigError(f"sweep: {key}: only {', '.join(s + '.*' for s in SWEEPABLE)} fields can "
                          "vary (the data is validated once for all variants)")


def expand_grid(grid: dict[str, list] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The variants of a sweep, one override dict each, in order. A mapping is a grid:
    ``{"loss.beta": [0.1, 0.2], "train.learning_rate": [1e-6]}`` -> every combination; a list is
    the variants themselves: ``[{"loss.beta": 0.1, "loss.loss_type": "ipo"}, {"loss.beta": 0.3}]``.
    Raises ConfigError for an empty grid or list, a non-sweepable field or a repeated variant."""
    if isinstance(grid, (list, tuple)):
        if not grid:
            raise ConfigError("sweep: the list of variants is empty; give at least one")
        variants = []
        for i, v in enumerate(grid):
            if not isinstance(v, dict) or not v:
                raise ConfigError(f"sweep: variant {i}: needs a non-empty mapping of section.field to "
                                  f"value (got {v!r})")
            for key in v:
                _check_key(key)
            if v in variants:
                raise ConfigError(f"sweep: variant {i} repeats variant {variants.index(v)} ({v})")
            variants.append(dict(v))
        return variants
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("sweep: the grid is empty; give at least one field with values")
    for key, values in grid.items():
        _check_key(key)
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"sweep: {key}: needs a non-empty list of values")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def best_index(metrics: list[dict[str, float]], metric: str, among: list[int] | None = None) -> int:
    """Index of the variant with the highest ``metric`` (missing or NaN never wins), chosen
    ``among`` the given indices (default: all; a sweep passes the variants not stopped early)."""
    def score(i: int) -> float:
        v = metrics[i].get(metric)
        return -math.inf if v is None or math.isnan(float(v)) else float(v)

    candidates = list(range(len(metrics))) if among is None else list(among)
    if not candidates:
        raise ValueError("sweep: no variant to choose from")
    best = max(candidates, key=score)
    if score(best) == -math.inf:
        raise ValueError(f"sweep: no variant has metric {metric!r}; choose another --metric")
    return best


def open_parent(cfg: RunConfig, name: str, grid: dict[str, list] | list[dict], metric: str,
                options: dict | None = None) -> str:
    """The parent MLflow run of a sweep (``options``: parallel, stop rule, logged as params)."""
    from dpo_engine import tracking

    tracking.connect(mlflow_uri(cfg))
    run_id = tracking.start_run(cfg.registry.experiment, name, tags={"dpo.sweep": "parent"})
    tracking.log_params(run_id, {"sweep": {"grid": grid, "metric": metric, **(options or {})}})
    return run_id


def adopt(parent_id: str, child_id: str, variant: dict, status: str = "completed") -> None:
    """Nest a variant's run under the parent (MLflow shows it as a child run); ``status`` is
    "completed" or "stopped early (lagging: ...)"."""
    from dpo_engine import tracking

    tracking.set_tags(child_id, {"mlflow.parentRunId": parent_id, "dpo.sweep": "child",
                                 "dpo.sweep.status": status,
                                 **{f"dpo.sweep.{k}": v for k, v in variant.items()}})


def close_parent(parent_id: str, children: list[str], best: int, metric: str,
                 value: float) -> None:
    """Record the winner on the parent, end the parent and the losing children."""
    from dpo_engine import tracking

    tracking.set_tags(parent_id, {"dpo.sweep.best_run_id": children[best]})
    tracking.log_metrics(parent_id, {f"best/{metric}": value})
    for i, child in enumerate(children):
        if i != best:
            tracking.end_run(child)
    tracking.end_run(parent_id)


# ------------------------------------------------------------------------------ early stop

# What the periodic evaluation logs (dpo_engine.evaluation.preference_metrics): the metrics a stop
# rule can compare at a checkpoint. Generation metrics (eval/win_rate) exist only after training.
STOP_METRICS = EVAL_STEP_METRICS
DEFAULT_STOP_METRIC = "eval/rewards/accuracies"  # comparable across beta and loss types
BOARD = "board.json"
STOP_SPEC = "sweep_stop.json"


def stop_options(margin: float | None, metric: str | None = None, mode: str | None = None) -> dict | None:
    """The stop rule of a sweep (None: no early stop). ``mode`` max/min (default: min for a loss,
    else max). Raises ConfigError for a bad margin, metric or mode."""
    if margin is None:
        return None
    try:
        margin = float(margin)
    except (TypeError, ValueError):
        raise ConfigError(f"sweep: stop margin must be a number (got {margin!r})") from None
    if not math.isfinite(margin) or margin < 0:
        raise ConfigError(f"sweep: stop margin must be >= 0 (got {margin})")
    metric = metric or DEFAULT_STOP_METRIC
    if metric not in STOP_METRICS:
        raise ConfigError(f"sweep: stop metric {metric!r} is not measured at checkpoints; use one of "
                          f"{', '.join(STOP_METRICS)}")
    mode = mode or ("min" if metric.endswith("loss") else "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"sweep: stop mode must be max or min (got {mode!r})")
    return {"stop_margin": margin, "stop_metric": metric, "stop_mode": mode}


def check_stop_configs(cfgs: list[RunConfig]) -> None:
    """A stop rule needs periodic evaluation in every variant."""
    for cfg in cfgs:
        if not cfg.train.eval_steps:
            raise ConfigError("sweep: a stop margin needs periodic evaluation: set train.eval_steps "
                              "(e.g. --set train.eval_steps=50)")


def write_stop_spec(run_dir: str | Path, board: str | Path, variant: str, options: dict) -> None:
    """Arm the stop rule for the train stage of the variant in ``run_dir``."""
    _write_atomic(Path(run_dir) / STOP_SPEC, {"board": str(board), "variant": variant, **options})


def stop_rule(run_dir: str | Path) -> "LaggingRule | None":
    """The stop rule armed for ``run_dir`` (a sweep variant), else None."""
    p = Path(run_dir) / STOP_SPEC
    if not p.is_file():
        return None
    spec = json.loads(p.read_text())
    return LaggingRule(Board(spec["board"]), spec["variant"], spec["stop_metric"], spec["stop_mode"],
                       spec["stop_margin"])


def _write_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


class Board:
    """``board.json``: ``{"values": {variant: {step: value}}, "decisions": {variant: {step: reason
    or null}}}`` of one metric, shared by a sweep's variants. Every change is a read-modify-write
    under an exclusive file lock (separate opens, so threads of one process exclude each other too)
    that lands by temp + rename: a reader never sees half a file, a writer never loses another's post.
    A variant's decision at a step is recorded once and then reused: the ranks of a multi-process
    training, and a resumed training, decide the same way."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _load(self) -> dict:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            raw = {}
        return {"values": raw.get("values", {}), "decisions": raw.get("decisions", {})}

    def read(self) -> dict[str, dict[int, float]]:
        """``{variant: {step: value}}``."""
        return {v: {int(st): float(x) for st, x in steps.items()}
                for v, steps in self._load()["values"].items()}

    def post(self, variant: str, points: dict[int, float]) -> None:
        """Record ``variant``'s values at steps (non-finite ones are left out)."""
        with self._locked():
            raw = self._load()
            mine = raw["values"].setdefault(variant, {})
            mine.update({str(int(st)): float(x) for st, x in points.items() if math.isfinite(float(x))})
            _write_atomic(self.path, raw)

    def decide(self, variant: str, step: int, value: float, decide) -> str | None:
        """Post ``value`` and return ``decide(values, step, value)`` (a stop reason or None), or
        the decision already recorded for ``variant`` at ``step``."""
        with self._locked():
            raw = self._load()
            done = raw["decisions"].get(variant, {})
            if str(step) in done:
                return done[str(step)]
            raw["values"].setdefault(variant, {})[str(step)] = float(value)
            values = {v: {int(st): float(x) for st, x in steps.items()} for v, steps in raw["values"].items()}
            reason = decide(values, step, value)
            raw["decisions"].setdefault(variant, {})[str(step)] = reason
            _write_atomic(self.path, raw)
            return reason


def best_at(board: dict[str, dict[int, float]], step: int, mode: str) -> tuple[float, str] | None:
    """(best value, its variant) over all variants at ``step``; None when nobody reached it."""
    vals = [(x, v) for v, steps in board.items() if (x := steps.get(step)) is not None]
    if not vals:
        return None
    return max(vals) if mode == "max" else min(vals)


def eval_points(history: list[dict], metric: str) -> dict[int, float]:
    """``{step: value}`` of ``metric`` in a training history."""
    return {int(h["step"]): float(h[metric]) for h in history if metric in h and "step" in h}


class LaggingRule:
    """``rule(history)``: at an evaluation step, post this variant's value to the board and stop
    when it is behind the best value at that step by more than ``margin``. ``reason`` says why."""

    def __init__(self, board: Board, variant: str, metric: str, mode: str, margin: float):
        self.board, self.variant, self.metric, self.mode, self.margin = board, variant, metric, mode, margin
        self.reason: str | None = None

    def __call__(self, history: list[dict]) -> bool:
        if self.reason is not None:
            return True
        if not history or self.metric not in history[-1] or "step" not in history[-1]:
            return False
        step, value = int(history[-1]["step"]), float(history[-1][self.metric])
        if not math.isfinite(value):
            return False
        self.reason = self.board.decide(self.variant, step, value, self._lagging)
        return self.reason is not None

    def _lagging(self, values: dict[str, dict[int, float]], step: int, value: float) -> str | None:
        best = best_at(values, step, self.mode)
        if best is None:
            return None
        lag = best[0] - value if self.mode == "max" else value - best[0]
        if lag <= self.margin:
            return None
        return (f"stopped early (lagging: {self.metric} {value:.4g} vs best {best[0]:.4g} "
                f"of variant {best[1]} at step {step})")
