"""Stage 5: log the trained model to MLflow, register a version, alias challenger/champion."""

from __future__ import annotations

from pathlib import Path

from data_contracts.config import RunConfig
from data_contracts.helpers import fingerprint
from data_contracts.state import mlflow_uri
from dpo_engine import tracking
from dpo_engine.stages import validate
from dpo_engine.stages.index import record
from dpo_engine.stages.runtime import Timer, code_version, crash_point

STAGE = "register"


def key(cfg: RunConfig, trained: dict, evaluated: dict) -> str:
    return fingerprint(STAGE, trained["fingerprint"], evaluated["fingerprint"],
                       cfg.section_hash("registry"), mlflow_uri(cfg))


# Every section that changes the trained model or how it is evaluated (and so the gate's verdict):
# not registry (where it is registered), tracking (where it is logged) nor run_name.
CONFIG_HASH_SECTIONS = ("data", "model", "reference", "peft", "loss", "train", "eval")


def config_hash(cfg: RunConfig) -> str:
    """Hash of the config that decides the trained model and its evaluation, as given (a ``{date}``
    template stays a template; fields marked ``exclude``, e.g. data.num_proc, are left out)."""
    return cfg.section_hash(*CONFIG_HASH_SECTIONS)


def version_tags(cfg: RunConfig, run_dir: Path, validated: dict) -> dict:
    """What a registered version records about where it came from (also read by the nightly
    skip check: ``data_fingerprint`` and ``config_hash``)."""
    return {"base_model": cfg.model.name_or_path,
            "dataset_fingerprint": validated["train"]["fingerprint"],
            "data_fingerprint": validated.get("data_fingerprint") or validate.data_fingerprint(cfg),
            "data_source": (validated.get("sources") or {}).get("train"),
            "config_hash": config_hash(cfg), "code_version": code_version(),
            "run_dir": str(run_dir)}


def run(cfg: RunConfig, run_dir: Path, validated: dict, trained: dict, evaluated: dict) -> dict:
    fp = key(cfg, trained, evaluated)
    if not cfg.registry.enabled:
        return {"stage": STAGE, "fingerprint": fp, "reused": False, "seconds": 0.0, "outputs": [],
                "metrics": {}, "summary": "register: skipped (registry.enabled is false)"}
    # no index reuse here: register_model itself is idempotent (one version per MLflow run)
    metrics = {**trained.get("metrics", {}), **evaluated.get("metrics", {})}
    run_id = trained["mlflow_run_id"]
    with Timer() as t:
        try:
            # an unreachable server is waited for (tracking.retry_*), then everything training and
            # evaluation could not send goes first, then the one version of this run
            tracking.connect(mlflow_uri(cfg), retry=tracking.RetryPolicy.from_config(cfg.registry),
                             wait=True)
            tracking.Outbox(run_id).send(wait=True)
            crash_point(STAGE, "outbox-sent")
            tags = version_tags(cfg, run_dir, validated)
            if tags["code_version"]:  # the training set the commit it ran from: kept; older runs get this one
                tracking.set_tags(run_id, {"mlflow.source.git.commit": tags["code_version"]}, keep_existing=True)
            gate = cfg.registry.gate
            info = tracking.register_model(
                run_id, trained["model_dir"], cfg.registry.model_name,
                metrics=metrics, gate_thresholds=gate.thresholds, tags=tags,
                beat_champion_metric=gate.beat_champion_metric, min_improvement=gate.min_improvement,
                on_step=lambda point: crash_point(STAGE, point),
                base_model_revision=cfg.model.revision,  # an adapter's base, when a hub id
                max_drop=gate.max_drop)
            tracking.end_run(run_id)
        except tracking.TrackingUnavailable as e:
            raise tracking.TrackingUnavailable(
                f"{e}; the trained model stays at {trained['model_dir']}: register it later with "
                f"`dpo register --run-dir {run_dir}`") from None
    gate = "passed: champion" if info["gate_passed"] else "not passed: " + "; ".join(info["gate_reasons"])
    if not info["gate_passed"] and info["champion_version"]:
        gate += f"; champion stays version {info['champion_version']}"
    result = {
        "stage": STAGE, "fingerprint": fp, "run_dir": str(run_dir), "reused": False, "seconds": t.seconds,
        **info, "outputs": [], "metrics": {},
        "summary": (f"register: {info['model_name']} version {info['version']} "
                    f"(aliases {', '.join(info['aliases'])}; gate {gate}) in {t.seconds:.1f}s"),
    }
    crash_point(STAGE, "before-record")
    return record(STAGE, fp, result)
