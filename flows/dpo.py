"""The ``dpo`` flow: validate -> precompute -> train -> evaluate -> register (deployment ``full``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from dpo_engine.pipeline import new_run_dir, nothing_new, prepare, write_summary
from dpo_engine.stages.table import PIPELINE
from tasks import stages as t
from tasks.run_names import name_flow_run


@flow(name="dpo", log_prints=True)
def dpo(config: str | None = None, overrides: dict[str, Any] | None = None,
        run_name: str | None = None) -> dict:
    """Run the five stages: validate, precompute, train, evaluate, register. Ends early with status
    ``skipped`` when the data and config equal those of the current champion. The flow run is named
    after the run folder. A grid sweep is its own flow: ``dpo-sweep`` (flows/sweep.py).

    Args:
        config: A run config YAML file (path on the machine that runs the flow); empty: the built-in defaults.
        overrides: Config fields to override, e.g. {"train.learning_rate": 5e-6, "loss.beta": 0.2}.
        run_name: The run folder's name (a re-run under the same name continues there); empty: a new
            timestamped folder.
    """
    cfg = prepare(config, {**(overrides or {}), **({"run_name": run_name} if run_name else {})})
    run_dir = str(new_run_dir(cfg))
    name_flow_run(Path(run_dir).name)
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
