"""The ``dpo`` flow: validate -> precompute -> train -> evaluate -> register (deployment ``full``)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from data_contracts.config import load_config
from dpo_engine.run import new_run_dir, preflight, write_summary
from tasks import stages as t


@flow(name="dpo", log_prints=True)
def dpo(config: str | None = None, overrides: dict[str, Any] | None = None,
        run_name: str | None = None) -> dict:
    """Run the five stages. ``config``: a YAML file (default: built-in defaults); ``overrides``:
    ``{"train.learning_rate": 5e-6, ...}``; ``run_name``: the run folder's name."""
    cfg = load_config(config, {**(overrides or {}), **({"run_name": run_name} if run_name else {})})
    preflight(cfg)
    run_dir = str(new_run_dir(cfg))
    results: dict[str, dict] = {}
    try:
        results["validate"] = t.validate(cfg, run_dir)
        results["precompute"] = t.precompute(cfg, run_dir, results["validate"])
        results["train"] = t.train(cfg, run_dir, results["validate"], results["precompute"])
        results["evaluate"] = t.evaluate(cfg, run_dir, results["validate"], results["precompute"],
                                         results["train"])
        results["register"] = t.register(cfg, run_dir, results["validate"], results["train"],
                                         results["evaluate"])
    except BaseException as e:
        write_summary(run_dir, results, "failed", error=f"{type(e).__name__}: {e}")
        raise
    return write_summary(run_dir, results, "completed")
