"""Prefect artifacts that lead from a run to what it made: a link to the MLflow run, a link to the
registered model version, the evaluation plots (image artifacts), and a sweep's leaderboard table.

MLflow links go to the MLflow UI: the tracking server itself when the tracking URI is http(s) (its
``#/experiments/<id>/runs/<run id>`` and ``#/models/<name>/versions/<v>`` pages), else the UI that
``mlflow ui`` serves on 127.0.0.1:5000 for the local store, the command to start it in the
description, with the ``runs:/`` / ``models:/`` URI. Plots are served by that same UI
(``get-artifact``: the run's ``evaluation/`` artifacts); their file paths are in the descriptions.
No credential (``user:password@``) of the tracking URI reaches an artifact. Publishing never fails a
stage: what cannot be looked up is said in a warning.
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path
from urllib.parse import quote, urlencode, urlparse

from prefect.artifacts import create_image_artifact, create_link_artifact, create_table_artifact

from data_contracts.helpers import redact_credentials
from data_contracts.state import mlflow_uri
from dpo_engine import tracking
from dpo_engine.tracking import client as tracking_client

LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
log = logging.getLogger(__name__)


def mlflow_ui(tracking_uri: str) -> tuple[str, str | None]:
    """(the MLflow UI's base URL, the command that starts it or None when the server is the UI)."""
    parts = urlparse(tracking_uri)
    if parts.scheme in ("http", "https"):
        netloc = parts.netloc.rpartition("@")[2]  # never the credentials
        return parts._replace(netloc=netloc, params="", query="", fragment="").geturl().rstrip("/"), None
    return LOCAL_UI, f"mlflow ui --backend-store-uri {shlex.quote(redact_credentials(tracking_uri))} --host 127.0.0.1"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{mlflow_ui(tracking_uri)[0]}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(tracking_uri: str, name: str, version) -> str:
    return f"{mlflow_ui(tracking_uri)[0]}/#/models/{quote(name, safe='')}/versions/{version}"


def run_artifact_url(tracking_uri: str, run_id: str, path: str) -> str:
    """The UI's URL of one artifact file of a run (what its image previews load)."""
    return f"{mlflow_ui(tracking_uri)[0]}/get-artifact?{urlencode({'path': path, 'run_uuid': run_id})}"


def _opened_by(tracking_uri: str) -> str:
    command = mlflow_ui(tracking_uri)[1]
    return f" (open the UI first: `{command}`)" if command else ""


def _experiment_id(cfg, run_id: str) -> str:
    tracking.connect(mlflow_uri(cfg), check=False)
    return tracking_client.mlflow_client().get_run(run_id).info.experiment_id


def _warn(what: str, e: BaseException) -> None:
    log.warning("no Prefect artifact for %s: %s", what, redact_credentials(f"{type(e).__name__}: {e}"))


# An artifact write to an unreachable Prefect API blocks for the client's retries (over a minute):
# after one fails, the UI's artifacts (links, plots, progress bars) are skipped for PAUSE_S seconds,
# so a server restarted mid-run costs training one wait, not one per logging step.
PAUSE_S = 120.0
_paused_until = 0.0


def ui_write(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, an optional write to the Prefect UI: ``None`` (and a warning) when it
    fails or while writes are paused after a failure; never raises."""
    global _paused_until
    if time.monotonic() < _paused_until:
        return None
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the UI never fails a stage
        _paused_until = time.monotonic() + PAUSE_S
        _warn(f"{what} (Prefect artifacts paused for {PAUSE_S:.0f} s)", e)
        return None


def publish_mlflow_run(cfg, trained: dict) -> None:
    """A link artifact (``dpo-mlflow-run``) to the training's MLflow run."""
    run_id = trained.get("mlflow_run_id")
    if not run_id:
        return
    uri = mlflow_uri(cfg)
    try:
        url = run_url(uri, _experiment_id(cfg, run_id), run_id)
        ui_write(f"MLflow run {run_id}", create_link_artifact, url, link_text=f"MLflow run {Path(trained['run_dir']).name} ({run_id})",
                             key="dpo-mlflow-run",
                             description=f"MLflow run `runs:/{run_id}` in experiment "
                                         f"{cfg.registry.experiment!r}{_opened_by(uri)}")
    except Exception as e:  # noqa: BLE001
        _warn(f"MLflow run {run_id}", e)


def publish_model_version(cfg, registered: dict) -> None:
    """A link artifact (``dpo-model-version``) to the registered model version."""
    name, version = registered.get("model_name"), registered.get("version")
    if not name or version is None:
        return
    uri = mlflow_uri(cfg)
    aliases = ", ".join(registered.get("aliases") or []) or "none"
    try:
        ui_write(f"model version {name}/{version}", create_link_artifact, model_version_url(uri, name, version),
                 link_text=f"models:/{name}/{version}",
                             key="dpo-model-version",
                             description=f"registered model `models:/{name}/{version}` (aliases: {aliases})"
                                         f"{_opened_by(uri)}")
    except Exception as e:  # noqa: BLE001
        _warn(f"model version {name}/{version}", e)


def publish_plots(cfg, trained: dict, evaluated: dict) -> None:
    """An image artifact per evaluation plot (``dpo-plot-training-curves``, ``dpo-plot-eval-scores``),
    loaded from the MLflow run's ``evaluation/`` artifacts."""
    run_id, uri = trained.get("mlflow_run_id"), mlflow_uri(cfg)
    for plot in evaluated.get("plots") or []:
        path = Path(plot)
        if not run_id or not path.is_file():
            continue
        try:
            ui_write(f"plot {path}", create_image_artifact, run_artifact_url(uri, run_id, f"evaluation/{path.name}"),
                                  key="dpo-plot-" + path.stem.replace("_", "-"),
                                  description=f"{path.name} of MLflow run {run_id}, file {path}{_opened_by(uri)}")
        except Exception as e:  # noqa: BLE001
            _warn(f"plot {path}", e)


def leaderboard(summary: dict) -> list[dict]:
    """A sweep's variants as table rows: the best marked, its metric, status, overrides and run."""
    metric = summary["metric"]
    return [{"best": "*" if i == summary["best"] else "", "variant": f"{i:02d}",
             "overrides": ", ".join(f"{k}={v}" for k, v in v["overrides"].items()),
             metric: v.get(metric), "status": v.get("status", "completed"), "steps": v.get("steps"),
             "run": Path(v["run_dir"]).name, "mlflow_run_id": v.get("mlflow_run_id")}
            for i, v in enumerate(summary["variants"])]


def publish_leaderboard(summary: dict) -> None:
    """The sweep's leaderboard as a table artifact (``dpo-sweep-leaderboard``)."""
    best = summary["variants"][summary["best"]]
    registered = (f"; registered models:/{summary['registered_model']}/{summary['registered_version']}"
                  if summary.get("registered_version") is not None else "")
    try:
        ui_write("the sweep leaderboard", create_table_artifact, leaderboard(summary), key="dpo-sweep-leaderboard",
                              description=f"sweep {Path(summary['run_dir']).name}: best by {summary['metric']} "
                                          f"is variant {summary['best']:02d} ({best['overrides']}){registered}")
    except Exception as e:  # noqa: BLE001
        _warn("the sweep leaderboard", e)
