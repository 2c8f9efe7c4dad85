"""The ``dpo`` flow: validate -> precompute -> train -> evaluate -> register (deployment ``full``)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from dpo_engine.pipeline import new_run_dir, nothing_new, prepare, write_summary
from dpo_engine.stages.table import PIPELINE
from flows.sweep import run_sweep
from tasks import stages as t


@flow(name="dpo", log_prints=True)
def dpo(config: str | None = None, overrides: dict[str, Any] | None = None,
        run_name: str | None = None, grid: dict[str, list] | list[dict[str, Any]] | None = None,
        metric: str = "eval/win_rate", parallel: int = 1, stop_margin: float | None = None,
        stop_metric: str | None = None, stop_mode: str | None = None, workers: bool = False) -> dict:
    """Run the five stages. ``config``: a YAML file (default: built-in defaults); ``overrides``:
    ``{"train.learning_rate": 5e-6, ...}``; ``run_name``: the run folder's name. Ends early with
    status ``skipped`` when the data and config equal those of the current champion.
    With ``grid`` it runs a sweep instead: a mapping (``{"loss.beta": [0.1, 0.3]}``) tries every
    combination, a list (``[{"loss.beta": 0.1}, {"loss.beta": 0.3, "loss.loss_type": "ipo"}]``)
    exactly those variants; each is trained and evaluated, and only the best by ``metric`` is registered (see flows/sweep.py):
    ``parallel`` variants at a time (Prefect concurrency limit ``dpo-train``), a variant whose
    ``stop_metric`` (default eval/rewards/accuracies) lags the best at a ``train.eval_steps``
    checkpoint by more than ``stop_margin`` stopped early; ``workers``: the variants run on Prefect
    task workers (``dpo sweep-worker``: one per GPU or machine) instead of in this process."""
    if grid:
        return run_sweep(config, overrides, run_name, grid, metric, parallel=parallel,
                         stop_margin=stop_margin, stop_metric=stop_metric, stop_mode=stop_mode,
                         workers=workers)
    cfg = prepare(config, {**(overrides or {}), **({"run_name": run_name} if run_name else {})})
    run_dir = str(new_run_dir(cfg))
    skip = nothing_new(cfg)
    if skip:
        print(skip)
        return write_summary(run_dir, {}, "skipped", reason=skip)
    results: dict[str, dict] = {}
    try:
        for stage in PIPELINE:  # each stage's task (looked up by name: tests replace them)
            results[stage.name] = getattr(t, stage.name)(cfg, run_dir, *(results[u] for u in stage.inputs))
    except BaseException as e:
        write_summary(run_dir, results, "failed", error=f"{type(e).__name__}: {e}")
        raise
    return write_summary(run_dir, results, "completed")
