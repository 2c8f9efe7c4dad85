"""The ``registry`` (with its promotion ``gate``) and ``tracking`` sections: MLflow names, retries, store, system metrics."""

from __future__ import annotations

from pydantic import Field, NonNegativeFloat, field_validator

from data_contracts.config.base import Name, Section
from data_contracts.helpers import redact_credentials


class GateConfig(Section):
    thresholds: dict[str, float] = Field(default_factory=dict, description="metric -> minimum value "
                                         "required for the new version to become champion.")
    beat_champion_metric: str | None = Field(None, description="Also require the new version to beat "
                                             "the current champion on this metric (e.g. 'eval/win_rate') "
                                             "by at least min_improvement; null: no comparison.")
    min_improvement: float = Field(0.0, description="new - champion must be >= this (0: a tie passes).")
    max_drop: dict[str, NonNegativeFloat] = Field(default_factory=dict, description="bench/<task>/<metric> "
                                                  "-> the most the policy may lose against the reference "
                                                  "on it: bench value >= bench_ref value - max_drop (0.01: "
                                                  "one point of accuracy). Needs the task in eval.benchmarks.")

    @field_validator("max_drop")
    @classmethod
    def _bench_metrics(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k in v if not k.startswith("bench/") or k.count("/") < 2]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a benchmark metric: use bench/<task>/<metric>, "
                             "e.g. bench/arc_easy/acc")
        return v


class RegistryConfig(Section):
    enabled: bool = Field(True, description="Log the run to MLflow and register the model (false: "
                          "no MLflow at all).")
    experiment: Name = Field("dpo", max_length=500, description="MLflow experiment of the runs.")
    model_name: Name = Field("dpo-policy", description="MLflow registered model name (no '/', ':' or "
                             "quote; MLflow rejects them at registration).")
    gate: GateConfig = Field(default_factory=GateConfig, description="When a new version becomes "
                             "champion.")
    skip_unchanged: bool = Field(False, description="End the flow early ('skipped: nothing new') when "
                                 "the data fingerprint and config hash equal those tagged on the current "
                                 "champion version. The nightly schedule sets it; manual runs train.")
    retry_timeout_s: float = Field(600.0, ge=0, description="How long MLflow writes keep retrying an "
                                   "unreachable tracking store (connection refused, time-out, HTTP 5xx, locked "
                                   "SQLite) before the stage fails with one line; registration waits this long "
                                   "for the server to come back. Training never waits: its metrics are kept in "
                                   "an outbox file and sent when the server answers. 0: one try.")
    retry_backoff_s: float = Field(2.0, gt=0, description="First wait between MLflow retries; doubles after "
                                   "each failure up to retry_max_backoff_s.")
    retry_max_backoff_s: float = Field(60.0, gt=0, description="Longest wait between MLflow retries.")

    @field_validator("model_name")
    @classmethod
    def _registrable(cls, v: str) -> str:
        bad = sorted({c for c in v if c in "/:'\""})
        if bad:
            raise ValueError(f"may not contain {' or '.join(repr(c) for c in bad)} (MLflow model names)")
        if v == "." or v.startswith(".."):
            raise ValueError("may not be '.' or start with '..' (MLflow model names)")
        return v


class TrackingConfig(Section):
    mlflow_tracking_uri: str | None = Field(None, description="Default: SQLite store under the state "
                                            "home. Or set MLFLOW_TRACKING_URI. No password in it (the config "
                                            "is saved with the run): MLflow reads MLFLOW_TRACKING_USERNAME "
                                            "and MLFLOW_TRACKING_PASSWORD from the environment.")
    system_metrics_interval_s: float = Field(10.0, ge=0, le=3600, description="Seconds between samples "
                                             "of the machine's CPU, memory, disk, network and (with pynvml) "
                                             "GPU use while training, logged to the run as MLflow's system/ "
                                             "metrics (its System metrics charts); needs psutil, else not "
                                             "logged (said in one line). 0: off. "
                                             "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.")

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_password(cls, v: str | None) -> str | None:
        if v is not None and redact_credentials(v) != v:
            raise ValueError("holds credentials (user:password@); the config is saved with every run: set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment instead")
        return v
