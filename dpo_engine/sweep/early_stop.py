"""Early stop of a lagging sweep variant.

With a stop margin, every variant posts its periodic eval metric (``train.eval_steps``) to a shared
*board* (``board.json`` in the sweep folder: variant -> step -> value and the decision taken there,
rewritten atomically under a file lock, so parallel variants never lose a post) and stops when it is
behind the best value any variant reached at the same step by more than the margin. The rule
reaches the train stage through ``sweep_stop.json`` in the variant's run folder (:func:`stop_rule`),
so it also works for retried tasks and process workers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from data_contracts.config import EVAL_STEP_METRICS, ConfigError, RunConfig
from data_contracts.helpers import file_lock, write_json

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
    write_json(Path(run_dir) / STOP_SPEC, {"board": str(board), "variant": variant, **options},
               indent=1, sort_keys=True)


def stop_rule(run_dir: str | Path) -> "LaggingRule | None":
    """The stop rule armed for ``run_dir`` (a sweep variant), else None."""
    p = Path(run_dir) / STOP_SPEC
    if not p.is_file():
        return None
    spec = json.loads(p.read_text())
    return LaggingRule(Board(spec["board"]), spec["variant"], spec["stop_metric"], spec["stop_mode"],
                       spec["stop_margin"])


class Board:
    """``board.json``: ``{"values": {variant: {step: value}}, "decisions": {variant: {step: reason
    or null}}}`` of one metric, shared by a sweep's variants. Every change is a read-modify-write
    under an exclusive file lock (separate opens, so threads of one process exclude each other too)
    that lands by temp + rename: a reader never sees half a file, a writer never loses another's post.
    A variant's decision at a step is recorded once and then reused: the ranks of a multi-process
    training, and a resumed training, decide the same way."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _locked(self):
        return file_lock(self.path.with_name(f".{self.path.name}.lock"))

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
            write_json(self.path, raw, indent=1, sort_keys=True)

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
            write_json(self.path, raw, indent=1, sort_keys=True)
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
