"""Registering a run's model: a new version of a registered model, the promotion gate, aliases.

Each registration adds a version with alias ``challenger``; it becomes ``champion`` when the gate
passes (every gate metric at least its threshold and, if asked, better than the current champion).
A base + adapter version is tagged ``model_format=adapter`` with its base
(``adapter_base_model``). Registration is idempotent per (model, run): a retry after an outage or a
crash at any point leaves exactly one version.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from mlflow.exceptions import MlflowException

from data_contracts.helpers import file_lock, fingerprint
from data_contracts.state import state_home
from dpo_engine.tracking import client as tracking_client  # mlflow_client read per call: tests patch it
from dpo_engine.tracking.client import is_transient, retried
from dpo_engine.tracking.packaging import ADAPTER, FULL, adapter_tags, log_hf_model, model_format, task_tags
from dpo_engine.tracking.runs import MAX_TAG_LEN, log_model_metrics

CHALLENGER = "challenger"
CHAMPION = "champion"
TAGGED_METRICS = ["eval/win_rate", "eval/win_rate_ci_low", "eval/win_rate_ci_high",
                  "eval/rewards/accuracies", "eval/rewards/margins", "eval/loss",
                  "eval/policy_score", "eval/kl_policy_reference"]  # copied onto version tags
METRIC_TAG = "metric."  # version tag prefix: metric.eval/win_rate


def version_of_run(model_name: str, run_id: str):
    """The first (lowest) version of ``model_name`` registered from ``run_id``, or None."""
    client = tracking_client.mlflow_client()
    found = [mv for mv in client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
             if mv.tags.get("run_id") == run_id]
    return min(found, key=lambda mv: int(mv.version)) if found else None


@contextmanager
def _registration_lock(model_name: str, run_id: str):
    """Serialise registrations of one (model, run) among processes sharing this state home."""
    with file_lock(state_home() / "locks" / f"register-{fingerprint(model_name, run_id)}.lock"):
        yield


def _gate(metrics: dict[str, float], thresholds: dict[str, float],
          max_drop: dict[str, float] | None = None) -> list[str]:
    """Reasons the gate fails (empty list: passed)."""
    reasons = []
    for name, minimum in thresholds.items():
        if metrics.get(name) is None:
            reasons.append(f"{name}: missing from metrics (required >= {minimum:g})")
            continue
        value = float(metrics[name])
        if math.isnan(value) or value < minimum:
            reasons.append(f"{name}: {value:.4g} < required {minimum:g}")
    return reasons + _drop_gate(metrics, max_drop or {})


def _drop_gate(metrics: dict[str, float], max_drop: dict[str, float]) -> list[str]:
    """Reasons a benchmark metric ``bench/<task>/<metric>`` lost more than its allowed drop against
    the reference's value of it (``bench_ref/<task>/<metric>``, measured in the same evaluation)."""
    reasons = []
    for name, drop in max_drop.items():
        task, ref_name = name.split("/")[1], "bench_ref/" + name.removeprefix("bench/")
        value, ref = metrics.get(name), metrics.get(ref_name)
        if value is None or ref is None:
            missing = " and ".join(n for n, v in ((name, value), (ref_name, ref)) if v is None)
            reasons.append(f"{name}: {missing} missing from metrics (allowed drop {drop:g} against the "
                           f"reference on task {task}; is the task in eval.benchmarks.tasks?)")
            continue
        value, ref = float(value), float(ref)
        if math.isnan(value) or math.isnan(ref) or value < ref - drop - 1e-9:  # 1e-9: float round-off
            reasons.append(f"{name}: task {task} policy {value:.4g} vs reference {ref:.4g}: lost "
                           f"{ref - value:.4g}, more than the allowed drop {drop:g}")
    return reasons


def champion(model_name: str):
    """The model version holding alias ``champion`` (with its tags), or None."""
    try:
        return tracking_client.mlflow_client().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as e:  # no such model or no champion yet; an outage is not "no champion"
        if is_transient(e):
            raise
        return None


def version_metric(mv, metric: str) -> float | None:
    """``metric`` of a model version: its ``metric.<name>`` tag, else its run's latest value."""
    if METRIC_TAG + metric in mv.tags:
        return float(mv.tags[METRIC_TAG + metric])
    if not mv.run_id:
        return None
    return tracking_client.mlflow_client().get_run(mv.run_id).data.metrics.get(metric)


def _champion_gate(champ, run_id: str, metrics: dict[str, float], metric: str,
                   min_improvement: float) -> list[str]:
    """Reasons the candidate does not beat the champion version ``champ`` by ``min_improvement`` on
    ``metric``. No champion yet, the candidate itself, or a champion without the metric: passes."""
    if champ is None or champ.run_id == run_id:
        return []
    best = version_metric(champ, metric)
    if best is None or math.isnan(best):
        return []
    value = metrics.get(metric)
    if value is None or math.isnan(float(value)):
        return [f"{metric}: missing from metrics (required to beat champion version {champ.version})"]
    if float(value) - best < min_improvement:
        return [f"{metric}: {float(value):.4g} does not beat champion version {champ.version} "
                f"({best:.4g}) by >= {min_improvement:g}"]
    return []


def _version_tags(run_id: str, metrics: dict[str, float], reasons: list[str],
                  tags: dict | None) -> dict[str, str]:
    out = {k: str(v)[:MAX_TAG_LEN] for k, v in (tags or {}).items() if v is not None}
    out.update({METRIC_TAG + m: repr(float(metrics[m])) for m in TAGGED_METRICS
                if metrics.get(m) is not None})
    out.update({"run_id": run_id, "gate_passed": str(not reasons).lower()})
    if reasons:
        out["gate_reasons"] = "; ".join(reasons)[:MAX_TAG_LEN]
    return out


@retried("register model")
def register_model(run_id: str, model_dir: str | Path, model_name: str, *,
                   metrics: dict[str, float], gate_thresholds: dict[str, float],
                   tags: dict[str, str] | None = None, beat_champion_metric: str | None = None,
                   min_improvement: float = 0.0,
                   on_step: Callable[[str], None] | None = None,
                   base_model_revision: str | None = None,
                   max_drop: dict[str, float] | None = None) -> dict:
    """Log the Hugging Face folder ``model_dir`` to the run, register it as a new version of
    ``model_name`` with alias ``challenger``, and make it ``champion`` when every gate metric
    is >= its threshold and, with ``beat_champion_metric``, it beats the current champion on that
    metric by at least ``min_improvement``, and every ``max_drop`` benchmark metric
    (``bench/<task>/<metric>``) is at most that much below the reference's (``bench_ref/...``).
    The version is tagged with ``tags``, the key eval metrics (``metric.<name>``) and the gate's outcome. Idempotent per (model_name, run_id), so a
    retry after an outage or a crash at any point leaves exactly one version. ``on_step(point)``
    is called at ``model-logged``, ``version-created`` and ``aliases-set`` (crash drills).

    ``model_dir`` may also be a PEFT adapter folder (adapter_config.json + adapter_model.safetensors):
    it is logged with the weights of the base model its adapter_config.json names (a local folder,
    or a hub id read from the local cache at ``base_model_revision``), and tagged ``model_format``
    ``adapter``, ``adapter_base_model``, ``adapter_peft_type`` (``base_model`` too unless given)."""
    on_step = on_step or (lambda point: None)
    model_dir = Path(model_dir)
    model_format(model_dir)  # a folder that cannot be registered fails before anything is logged
    client = tracking_client.mlflow_client()
    reasons = _gate(metrics, gate_thresholds, max_drop)
    # one registration of a run at a time, whatever the model name: the clean-up of the run's
    # orphan logged models (_delete_orphan_models) never removes an upload in progress
    with _registration_lock(model_name, run_id), _registration_lock("", run_id):
        mv = _create_version_once(client, model_name, run_id, model_dir, metrics, reasons, tags,
                                  on_step, base_model_revision)
    # The comparison with the champion and the aliases, under one per-model lock (one writer at a
    # time in this state home): the champion is read inside it, so a better version registered at
    # the same moment is never left without the alias it earned, and the result states the aliases
    # as they are when the lock is let go.
    with _registration_lock(model_name, "\0aliases"):
        champ = champion(model_name)
        if beat_champion_metric:
            reasons = reasons + _champion_gate(champ, run_id, metrics, beat_champion_metric, min_improvement)
        _record_gate(client, model_name, mv, reasons)
        newest = max(int(v.version) for v in client.search_model_versions(f"name = '{model_name}'"))
        if int(mv.version) == newest:
            _set_alias(client, model_name, CHALLENGER, mv.version)
        # without a comparison metric the champion only moves forward, to a newer passing version
        if not reasons and (beat_champion_metric or champ is None or int(champ.version) <= int(mv.version)):
            _set_alias(client, model_name, CHAMPION, mv.version)
        on_step("aliases-set")
        aliases = sorted(client.get_model_version(model_name, mv.version).aliases)
        champ = champion(model_name)
    return {"model_name": model_name, "version": int(mv.version),
            "model_uri": f"models:/{model_name}/{mv.version}", "aliases": aliases,
            "gate_passed": not reasons, "gate_reasons": reasons, "run_id": run_id,
            "champion_version": int(champ.version) if champ else None}


def _record_gate(client, model_name: str, mv, reasons: list[str]) -> None:
    """The version's gate tags as decided now (the champion comparison happens after it exists)."""
    passed = str(not reasons).lower()
    if mv.tags.get("gate_passed") != passed:
        client.set_model_version_tag(model_name, mv.version, "gate_passed", passed)
    text = "; ".join(reasons)[:MAX_TAG_LEN]
    if reasons and mv.tags.get("gate_reasons") != text:
        client.set_model_version_tag(model_name, mv.version, "gate_reasons", text)
    elif not reasons and "gate_reasons" in mv.tags:
        client.delete_model_version_tag(model_name, mv.version, "gate_reasons")


def _set_alias(client, model_name: str, alias: str, version) -> None:
    """Set ``alias``; a writer elsewhere setting it at the same moment (another machine) makes the
    store's unique key fail once: then it is set again."""
    for attempt in range(3):
        try:
            client.set_registered_model_alias(model_name, alias, version)
            return
        except MlflowException as e:
            if attempt == 2 or not any(t in str(e) for t in ("UNIQUE constraint", "already exists",
                                                            "Duplicate entry", "duplicate key")):
                raise
            time.sleep(0.2 * (attempt + 1))


def _delete_orphan_models(client, run_id: str) -> list[str]:
    """Delete the run's logged models that no model version points at: what an earlier try left
    when its upload was cut (killed, SIGTERM, a full disk, a time-out retried) or it stopped before
    creating the version. Called under the run's registration lock, just before the model is logged
    again, so a run keeps one logged model per version. MLflow marks them deleted (search no longer
    returns them; ``mlflow gc`` removes their artifacts). Returns their ids."""
    experiment = client.get_run(run_id).info.experiment_id
    used = {mv.source for mv in client.search_model_versions(f"run_id = '{run_id}'")}
    orphans = [m.model_id for m in client.search_logged_models(
        [experiment], filter_string=f"source_run_id = '{run_id}'")
        if m.name == "model" and m.model_uri not in used]  # log_hf_model's name: nothing else is touched
    for model_id in orphans:
        client.delete_logged_model(model_id)
    return orphans


def _create_version_once(client, model_name, run_id, model_dir, metrics, reasons, tags, on_step,
                         base_model_revision=None):
    """The run's version, created unless it exists. Two registrations of one run
    that race past the lock (processes on other machines) both create; each then keeps the lowest
    version of the run and deletes its own if it is not that one, so exactly one remains."""
    mv = version_of_run(model_name, run_id)
    if mv is None:
        model_dir = Path(model_dir)
        tags = dict(tags or {})
        if model_format(model_dir) == ADAPTER:
            format_tags = adapter_tags(model_dir)
            tags.setdefault("base_model", format_tags.get("adapter_base_model"))
            tags.update(format_tags)
        else:
            tags["model_format"] = FULL
        tags.update(task_tags(model_dir, base_model_revision))  # llm/v1/chat or text-generation
        _delete_orphan_models(client, run_id)
        model_uri, model_id = log_hf_model(run_id, model_dir, base_model_revision)
        # the model's page shows its metrics (as the run has them: the eval ones at the last step)
        log_model_metrics(run_id, model_id, metrics)
        on_step("model-logged")
        try:
            client.create_registered_model(model_name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = client.create_model_version(model_name, source=model_uri, run_id=run_id,
                                         tags=_version_tags(run_id, metrics, reasons, tags),
                                         model_id=model_id)
        on_step("version-created")
        first = version_of_run(model_name, run_id)
        if first is not None and int(first.version) < int(mv.version):
            client.delete_model_version(model_name, mv.version)
            mv = first
    return mv

