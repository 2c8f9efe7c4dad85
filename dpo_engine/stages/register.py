"""Stage 5: log the trained model to MLflow, register a version, alias challenger/champion."""

from __future__ import annotations

from pathlib import Path

from data_contracts.config import RunConfig, mlflow_uri
from dpo_engine import registry
from dpo_engine.stages.common import Timer, fingerprint, record

STAGE = "register"


def key(cfg: RunConfig, trained: dict, evaluated: dict) -> str:
    return fingerprint(STAGE, trained["fingerprint"], evaluated["fingerprint"],
                       cfg.section_hash("registry"), mlflow_uri(cfg))


def run(cfg: RunConfig, run_dir: Path, validated: dict, trained: dict, evaluated: dict) -> dict:
    fp = key(cfg, trained, evaluated)
    if not cfg.registry.enabled:
        return {"stage": STAGE, "fingerprint": fp, "reused": False, "seconds": 0.0, "outputs": [],
                "metrics": {}, "summary": "register: skipped (registry.enabled is false)"}
    # no index reuse here: register_model itself is idempotent (one version per MLflow run)
    metrics = {**trained.get("metrics", {}), **evaluated.get("metrics", {})}
    with Timer() as t:
        registry.connect(mlflow_uri(cfg))
        info = registry.register_model(
            trained["mlflow_run_id"], trained["model_dir"], cfg.registry.model_name,
            metrics=metrics, gate_thresholds=cfg.registry.gate.thresholds,
            tags={"base_model": cfg.model.name_or_path,
                  "dataset_fingerprint": validated["train"]["fingerprint"],
                  "config_hash": cfg.section_hash("data", "model", "loss", "train"),
                  "run_dir": str(run_dir)})
        registry.end_run(trained["mlflow_run_id"])
    gate = "passed: champion" if info["gate_passed"] else "not passed: " + "; ".join(info["gate_reasons"])
    result = {
        "stage": STAGE, "fingerprint": fp, "run_dir": str(run_dir), "reused": False, "seconds": t.seconds,
        **info, "outputs": [], "metrics": {},
        "summary": (f"register: {info['model_name']} version {info['version']} "
                    f"(aliases {', '.join(info['aliases'])}; gate {gate}) in {t.seconds:.1f}s"),
    }
    return record(STAGE, fp, result)
