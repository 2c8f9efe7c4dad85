"""Runs of an experiment side by side: a table of params, metrics and registered versions, and a
PNG of their training curves and win-rates."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd

from data_contracts.state import state_home
from dpo_engine.tracking import client as tracking_client  # mlflow_client read per call: tests patch it
from dpo_engine.tracking.runs import metric_histories, win_rate

DEFAULT_METRICS = ["rewards/margins", "rewards/accuracies", "loss",
                   "eval/rewards/accuracies", "eval/win_rate"]
KEY_PARAMS = ["loss.loss_type", "loss.beta", "loss.label_smoothing", "train.learning_rate",
              "train.per_device_train_batch_size", "train.gradient_accumulation_steps",
              "train.max_steps", "train.num_train_epochs", "model.name_or_path", "data.source"]


def compare_runs(experiment: str, last: int = 10, metrics: list[str] | None = None,
                 params: list[str] | None = None, sweep: str | None = None):
    """One row per run of ``experiment`` (newest first) with key params, the latest value of each
    metric and the registered model versions (``name/version``) and aliases from that run. A sweep
    child run names its sweep (column ``sweep``: the parent run's name); the parent runs themselves
    (no training of their own) are left out. ``sweep`` (a parent run's name or id): that sweep's
    variants only, in variant order, with their overrides (``variant``), status and ``best``."""
    metrics = list(metrics or DEFAULT_METRICS)
    client = tracking_client.mlflow_client()
    exp = client.get_experiment_by_name(experiment)
    base = ["run_name", "run_id", "start_time", "status", "sweep"]
    tail = ["model_versions", "aliases"]
    if exp is None:
        return pd.DataFrame(columns=base + metrics + tail)
    parent = _sweep_parent(client, exp.experiment_id, sweep) if sweep else None
    if parent is not None:
        runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=1000, order_by=["attributes.start_time ASC"])
        runs = sorted(runs, key=lambda r: r.info.run_name or "")  # <sweep>-00, -01, ...
        base += ["variant", "sweep_status", "best"]
    else:
        runs, token = [], None
        while len(runs) < last:  # newest first, parents skipped
            page = client.search_runs([exp.experiment_id], max_results=max(last, 50),
                                      order_by=["attributes.start_time DESC"], page_token=token)
            runs += [r for r in page if r.data.tags.get("dpo.sweep") != "parent"]
            token = page.token
            if not token:
                break
        runs = runs[:last]
    parents = {}
    wanted = params or KEY_PARAMS
    param_cols = [p for p in wanted if any(p in r.data.params for r in runs)]
    rows = []
    for r in runs:
        # search results carry no aliases: fetch each version
        versions = [client.get_model_version(v.name, v.version)
                    for v in client.search_model_versions(f"run_id = '{r.info.run_id}'")]
        pid = r.data.tags.get("mlflow.parentRunId")
        if pid and pid not in parents:
            parents[pid] = client.get_run(pid)
        row = {"run_name": r.info.run_name, "run_id": r.info.run_id,
               "start_time": pd.to_datetime(r.info.start_time, unit="ms", utc=True),
               "status": r.info.status, "sweep": parents[pid].info.run_name if pid else ""}
        if parent is not None:
            prefix = "dpo.sweep."
            row["variant"] = ", ".join(f"{k[len(prefix):]}={v}" for k, v in sorted(r.data.tags.items())
                                       if k.startswith(prefix) and k[len(prefix):] not in ("status",))
            row["sweep_status"] = r.data.tags.get("dpo.sweep.status", "")
            row["best"] = "*" if parent.data.tags.get("dpo.sweep.best_run_id") == r.info.run_id else ""
        row.update({p: r.data.params.get(p) for p in param_cols})
        row.update({m: r.data.metrics.get(m) for m in metrics})
        row["model_versions"] = ", ".join(f"{v.name}/{v.version}" for v in versions)
        row["aliases"] = ", ".join(f"{v.name}@{a}" for v in versions for a in sorted(v.aliases))
        rows.append(row)
    return pd.DataFrame(rows, columns=base + param_cols + metrics + tail)


def _sweep_parent(client, experiment_id: str, sweep: str):
    """The parent run of sweep ``sweep`` (its run name or run id); ValueError naming the sweeps
    there are when none matches."""
    parents = client.search_runs([experiment_id], "tags.`dpo.sweep` = 'parent'", max_results=1000,
                                 order_by=["attributes.start_time DESC"])
    for r in parents:
        if sweep in (r.info.run_id, r.info.run_name):
            return r
    known = ", ".join(sorted({r.info.run_name for r in parents})) or "none"
    raise ValueError(f"no sweep {sweep!r} in this experiment (sweeps: {known})")


def compare_plot(df, path: str | None) -> Path:
    """PNG overlaying the runs' reward-margin and accuracy curves and their eval win-rates."""
    # lazy: the dpo_engine.evaluation package imports torch and transformers, which importing
    # tracking (the pipeline, the CLI) must not pay for; plots imports matplotlib lazily itself
    from dpo_engine.evaluation import plots

    if path is None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = state_home() / "compare" / f"compare-{stamp}.png"
    curves, win_rates = {}, {}
    for row in df.itertuples(index=False):
        label = f"{row.run_name} ({row.run_id[:6]})"
        curves[label] = metric_histories(row.run_id, list(plots.COMPARE_CURVES))
        win_rates[label] = win_rate(row.run_id)
    return plots.compare_runs(curves, win_rates, path)
