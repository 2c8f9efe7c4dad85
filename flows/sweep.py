"""A grid sweep inside the ``dpo`` flow (deployment ``sweep``): validate once, precompute once per
reference key, train + evaluate each variant as a child MLflow run, register only the best."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from data_contracts.config import load_config
from dpo_engine import stages
from dpo_engine import sweep as sw
from dpo_engine.run import new_run_dir, preflight
from dpo_engine.stages.common import write_json
from tasks import stages as t


def run_sweep(config: str | None, overrides: dict[str, Any] | None, run_name: str | None,
              grid: dict[str, list], metric: str) -> dict:
    variants = sw.expand_grid(grid)
    name = run_name or "sweep-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    cfgs = [load_config(config, {**(overrides or {}), **v, "run_name": f"{name}-{i:02d}"})
            for i, v in enumerate(variants)]
    base = load_config(config, {**(overrides or {}), "run_name": name})
    preflight(base)
    sweep_dir = str(new_run_dir(base))
    parent = sw.open_parent(base, name, grid, metric)

    validated = t.validate(base, sweep_dir)
    precomputed: dict[str, dict] = {}
    rows = []
    for cfg, variant in zip(cfgs, variants):
        run_dir = str(new_run_dir(cfg))
        pkey = stages.precompute.key(cfg, validated)
        if pkey not in precomputed:
            precomputed[pkey] = t.precompute(cfg, sweep_dir, validated)
        trained = t.train(cfg, run_dir, validated, precomputed[pkey])
        sw.adopt(parent, trained["mlflow_run_id"], variant)
        evaluated = t.evaluate(cfg, run_dir, validated, precomputed[pkey], trained)
        rows.append({"cfg": cfg, "variant": variant, "run_dir": run_dir, "trained": trained,
                     "evaluated": evaluated})

    best = sw.best_index([r["evaluated"]["metrics"] for r in rows], metric)
    winner = rows[best]
    registered = t.register(winner["cfg"], winner["run_dir"], validated, winner["trained"],
                            winner["evaluated"])
    value = winner["evaluated"]["metrics"][metric]
    sw.close_parent(parent, [r["trained"]["mlflow_run_id"] for r in rows], best, metric, value)
    summary = {
        "run_dir": sweep_dir, "status": "completed", "mlflow_parent_run_id": parent, "metric": metric,
        "best": best, "best_value": value,
        "variants": [{"overrides": r["variant"], "run_dir": r["run_dir"],
                      "mlflow_run_id": r["trained"]["mlflow_run_id"],
                      metric: r["evaluated"]["metrics"].get(metric)} for r in rows],
        "registered_model": registered.get("model_name"), "registered_version": registered.get("version"),
        "aliases": registered.get("aliases"), "gate_passed": registered.get("gate_passed"),
    }
    write_json(Path(sweep_dir) / "summary.json", summary)
    print(f"sweep: best of {len(rows)} by {metric}: variant {best} {winner['variant']} ({value:.4g}); "
          f"{registered.get('summary', '')}")
    return summary
