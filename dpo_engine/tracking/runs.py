"""Experiments and runs, and what is logged to a run: params, metrics, tags, artifacts, tables,
dataset inputs; and a run's metrics attached to the model it logged.

Every function works on an explicit run id through :class:`mlflow.MlflowClient`, so stages running
in separate processes can log to the same run; nothing is left as MLflow's "active run". Local
stores (sqlite) keep all artifacts under ``state_home()/mlflow/artifacts/<experiment>``, never in
``./mlruns`` or ``$HOME``.
"""

from __future__ import annotations

import posixpath
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from data_contracts.state import state_home
from dpo_engine.tracking import client as tracking_client  # mlflow_client read per call: tests patch it
from dpo_engine.tracking.client import retried

MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_LEN = 5000  # registry tag value limit
BATCH = 100  # params/tags per log_batch request


def _is_local_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("sqlite", "file", "")


@retried("create experiment")
def ensure_experiment(name: str) -> str:
    """Experiment id of ``name``, created (or restored) if needed."""
    client = tracking_client.mlflow_client()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if _is_local_store(mlflow.get_tracking_uri()):
            folder = state_home() / "mlflow" / "artifacts" / name
            folder.mkdir(parents=True, exist_ok=True)
            location = folder.as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


@retried("start run")
def start_run(experiment: str, run_name: str, tags: dict | None = None,
              run_id: str | None = None) -> str:
    """Create a run (or re-open ``run_id``) and return its id. It is not made the active run."""
    client = tracking_client.mlflow_client()
    if run_id:
        run = client.get_run(run_id)
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        if tags:
            set_tags(run_id, tags)
        return run_id
    exp_id = ensure_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name,
                            tags={k: str(v) for k, v in (tags or {}).items()})
    return run.info.run_id


@retried("end run")
def end_run(run_id: str, status: str = "FINISHED") -> None:
    tracking_client.mlflow_client().set_terminated(run_id, status=status)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{'loss': {'beta': 0.1}}`` -> ``{'loss.beta': 0.1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@retried("log params")
def log_params(run_id: str, params: dict) -> None:
    """Log (nested) params. Keys already logged with the same value are skipped; a different
    value for an existing key raises ValueError (MLflow params are immutable)."""
    client = tracking_client.mlflow_client()
    existing = client.get_run(run_id).data.params
    new, changed = [], []
    for key, value in flatten(params).items():
        value = str(value)[:MAX_PARAM_LEN]
        if key not in existing:
            new.append(Param(key, value))
        elif existing[key] != value:
            changed.append(f"{key} ({existing[key]!r} -> {value!r})")
    if changed:
        raise ValueError(f"run {run_id} already has different values for params: "
                         + ", ".join(changed))
    for i in range(0, len(new), BATCH):
        client.log_batch(run_id, params=new[i:i + BATCH])


@retried("log metrics")
def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log metrics in one batch; names are kept as given (``rewards/margins``). None is skipped."""
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
    for i in range(0, len(items), 1000):
        tracking_client.mlflow_client().log_batch(run_id, metrics=items[i:i + 1000])


@retried("set tags")
def set_tags(run_id: str, tags: dict, keep_existing: bool = False) -> None:
    """Set the run's ``tags``; ``keep_existing``: only those the run does not have yet."""
    if keep_existing:
        have = tracking_client.mlflow_client().get_run(run_id).data.tags
        tags = {k: v for k, v in tags.items() if k not in have}
    items = [RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in tags.items()]
    for i in range(0, len(items), BATCH):
        tracking_client.mlflow_client().log_batch(run_id, tags=items[i:i + BATCH])


@retried("log artifact")
def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file, or every file of a folder, under ``artifact_path``."""
    path = Path(path)
    if path.is_dir():
        tracking_client.mlflow_client().log_artifacts(run_id, str(path), artifact_path)
    else:
        tracking_client.mlflow_client().log_artifact(run_id, str(path), artifact_path)


@retried("log dict")
def log_dict(run_id: str, dictionary: dict, filename: str) -> None:
    """Write ``dictionary`` as JSON/YAML (by ``filename``'s suffix) into the run's artifacts."""
    tracking_client.mlflow_client().log_dict(run_id, dictionary, filename)


@retried("log table")
def log_table(run_id: str, table, artifact_file: str) -> None:
    """Log a DataFrame as an MLflow table (shown in the UI's artifact view and Evaluation tab).
    Logged again (a re-run after a crash), it replaces the table: MLflow's ``log_table`` would
    append the rows a second time."""
    client = tracking_client.mlflow_client()
    folder = posixpath.dirname(posixpath.normpath(artifact_file)) or None
    if artifact_file not in [f.path for f in client.list_artifacts(run_id, path=folder)]:
        client.log_table(run_id, data=table, artifact_file=artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:  # the same file MLflow writes, over the old one
        path = Path(tmp) / posixpath.basename(artifact_file)
        table.to_json(path, orient="split", index=False, date_format="iso")
        client.log_artifact(run_id, str(path), folder)


def dataset_inputs(datasets: list[dict]) -> list[DatasetInput]:
    """MLflow dataset inputs of descriptions ``{name, digest, source_type, source, schema, profile,
    context, tags}`` (:func:`dpo_engine.tracking.datasets.split_inputs`); ``context`` becomes the
    ``mlflow.data.context`` tag the UI shows. Logged again, they add nothing: MLflow keeps one input
    of a run per dataset (name, digest)."""
    out = []
    for d in datasets:
        tags = {**(d.get("tags") or {}), **({MLFLOW_DATASET_CONTEXT: d["context"]} if d.get("context") else {})}
        out.append(DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"],
                                        d.get("schema"), d.get("profile")),
                                tags=[InputTag(k, str(v)[:500]) for k, v in tags.items()]))
    return out


@retried("log model metrics")
def log_model_metrics(run_id: str, model_id: str, names) -> list[str]:
    """Attach the run's metrics ``names`` to its logged model ``model_id`` (MLflow 3's LoggedModel:
    the model's page lists them): each metric's latest point in the run (highest step, then newest)
    logged again with the model id, its run and the dataset it was computed on (the run's
    ``evaluation`` input for ``eval/`` names, its ``training`` input otherwise, when logged). Same
    name, step, value and time stamp as the run's point: the run's history gains nothing. Names the
    run lacks are left out. Returns the names attached."""
    client = tracking_client.mlflow_client()
    inputs = client.get_run(run_id).inputs
    by_context = {}
    for di in (inputs.dataset_inputs if inputs else []):
        context = {t.key: t.value for t in di.tags}.get(MLFLOW_DATASET_CONTEXT)
        by_context.setdefault(context, di.dataset)
    batch = []
    for name in dict.fromkeys(names):
        history = client.get_metric_history(run_id, name)
        if not history:
            continue
        last = max(history, key=lambda m: (m.step, m.timestamp))
        ds = by_context.get("evaluation" if name.startswith("eval/") else "training")
        batch.append(Metric(name, last.value, last.timestamp, last.step, model_id=model_id,
                            dataset_name=ds.name if ds else None, dataset_digest=ds.digest if ds else None,
                            run_id=run_id))
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i:i + 1000])
    return [m.key for m in batch]


def metric_histories(run_id: str, names: list[str]) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` sorted by step; metrics the run lacks are left out."""
    client = tracking_client.mlflow_client()
    out = {}
    for name in names:
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        if hist:
            out[name] = hist
    return out


def win_rate(run_id: str) -> tuple[float, float, float] | None:
    """(eval win-rate, 95% CI low, high) of a run, or None if it was not judged."""
    m = tracking_client.mlflow_client().get_run(run_id).data.metrics
    if "eval/win_rate" not in m:
        return None
    rate = m["eval/win_rate"]
    return rate, m.get("eval/win_rate_ci_low", rate), m.get("eval/win_rate_ci_high", rate)
