"""A grid sweep: variants of one config, each trained and evaluated, the best one registered.

The flow (``flows/sweep.py``) validates the data once, precomputes once per distinct reference
cache key, and trains/evaluates every variant as a child MLflow run under one parent run.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from data_contracts.config import ConfigError, RunConfig, mlflow_uri

# Sections a variant may change: validation (data, model) is shared by all variants.
SWEEPABLE = ("loss", "train", "eval", "reference")


def expand_grid(grid: dict[str, list]) -> list[dict[str, Any]]:
    """``{"loss.beta": [0.1, 0.2], "train.learning_rate": [1e-6]}`` -> one override dict per
    combination, in order. Raises ConfigError for an empty grid or a non-sweepable field."""
    if not grid:
        raise ConfigError("sweep: the grid is empty; give at least one field with values")
    for key, values in grid.items():
        if key.split(".", 1)[0] not in SWEEPABLE:
            raise ConfigError(f"sweep: {key}: only {', '.join(s + '.*' for s in SWEEPABLE)} fields can "
                              "vary (the data is validated once for all variants)")
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"sweep: {key}: needs a non-empty list of values")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def best_index(metrics: list[dict[str, float]], metric: str) -> int:
    """Index of the variant with the highest ``metric`` (missing or NaN never wins)."""
    def score(i: int) -> float:
        v = metrics[i].get(metric)
        return -math.inf if v is None or math.isnan(float(v)) else float(v)

    best = max(range(len(metrics)), key=score)
    if score(best) == -math.inf:
        raise ValueError(f"sweep: no variant has metric {metric!r}; choose another --metric")
    return best


def open_parent(cfg: RunConfig, name: str, grid: dict[str, list], metric: str) -> str:
    """The parent MLflow run of a sweep."""
    from dpo_engine import registry

    registry.connect(mlflow_uri(cfg))
    run_id = registry.start_run(cfg.registry.experiment, name, tags={"dpo.sweep": "parent"})
    registry.log_params(run_id, {"sweep": {"grid": grid, "metric": metric}})
    return run_id


def adopt(parent_id: str, child_id: str, variant: dict) -> None:
    """Nest a variant's run under the parent (MLflow shows it as a child run)."""
    from dpo_engine import registry

    registry.set_tags(child_id, {"mlflow.parentRunId": parent_id, "dpo.sweep": "child",
                                 **{f"dpo.sweep.{k}": v for k, v in variant.items()}})


def close_parent(parent_id: str, children: list[str], best: int, metric: str,
                 value: float) -> None:
    """Record the winner on the parent, end the parent and the losing children."""
    from dpo_engine import registry

    registry.set_tags(parent_id, {"dpo.sweep.best_run_id": children[best]})
    registry.log_metrics(parent_id, {f"best/{metric}": value})
    for i, child in enumerate(children):
        if i != best:
            registry.end_run(child)
    registry.end_run(parent_id)
