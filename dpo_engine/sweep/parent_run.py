"""A sweep in MLflow: one parent run, each variant's training run nested under it as a child, the
winner recorded on the parent."""

from __future__ import annotations

from data_contracts.config import RunConfig
from data_contracts.state import mlflow_uri
from dpo_engine import tracking


def open_parent(cfg: RunConfig, name: str, grid: dict[str, list] | list[dict], metric: str,
                options: dict | None = None) -> str:
    """The parent MLflow run of a sweep (``options``: parallel, stop rule, logged as params)."""
    tracking.connect(mlflow_uri(cfg))
    run_id = tracking.start_run(cfg.registry.experiment, name, tags={"dpo.sweep": "parent"})
    tracking.log_params(run_id, {"sweep": {"grid": grid, "metric": metric, **(options or {})}})
    return run_id


def adopt(parent_id: str, child_id: str, variant: dict, status: str = "completed") -> None:
    """Nest a variant's run under the parent (MLflow shows it as a child run); ``status`` is
    "completed" or "stopped early (lagging: ...)"."""
    tracking.set_tags(child_id, {"mlflow.parentRunId": parent_id, "dpo.sweep": "child",
                                 "dpo.sweep.status": status,
                                 **{f"dpo.sweep.{k}": v for k, v in variant.items()}})


def close_parent(parent_id: str, children: list[str], best: int, metric: str,
                 value: float) -> None:
    """Record the winner on the parent, end the parent and the losing children."""
    tracking.set_tags(parent_id, {"dpo.sweep.best_run_id": children[best]})
    tracking.log_metrics(parent_id, {f"best/{metric}": value})
    for i, child in enumerate(children):
        if i != best:
            tracking.end_run(child)
    tracking.end_run(parent_id)
