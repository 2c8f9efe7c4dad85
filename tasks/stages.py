"""One Prefect task per stage.

Cache keys are the stages' content fingerprints (data, model, config section, upstream results)
plus a token of the recorded outputs, so a key never points at outputs that were deleted: a run
after a failure in stage k reuses stages before k, and changing only ``train.learning_rate``
reuses validate and precompute.

A task run is named by its stage and what it works on (:mod:`tasks.run_names`), reports the stage's
progress to the UI while it runs (:mod:`tasks.progress`) and publishes its summary (and links:
:mod:`tasks.artifacts`). Transient failures are retried with exponential backoff and jitter.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.tasks import exponential_backoff

from data_contracts.errors import user_error
from data_contracts.helpers import redact_credentials
from dpo_engine.stages.index import outputs_token
from dpo_engine.stages.table import STAGE
from tasks import artifacts, progress
from tasks.run_names import task_run_namer

RETRIES = 2
RETRY_BACKOFF_S = 2.0  # the first retry after about 2 s, the next after about 4 s, ...
RETRY_JITTER = 0.5  # each delay drawn at random up to 1.5x its value: retries of parallel runs spread out


def _cache_key(stage: str):
    def key_fn(context, parameters) -> str | None:
        spec = STAGE[stage]
        fp = spec.key(parameters["cfg"], {u: parameters[STAGE[u].result] for u in spec.key_inputs})
        token = outputs_token(stage, fp)
        return None if token is None else f"dpo-{stage}-{fp}-{token}"

    return key_fn


def _publish(result: dict) -> None:
    lines = [f"### {result['stage']}", "", result["summary"], ""]
    metrics = result.get("metrics") or {}
    if metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in metrics.items()]
    create_markdown_artifact(key=f"dpo-{result['stage']}", markdown="\n".join(lines),
                             description=result["summary"])
    print(result["summary"])


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Crashes and transient failures are retried; a user error (bad data/config) fails at once."""
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001
        return user_error(e) is None
    return True


class _OneLineUserErrors(logging.Filter):
    """Log a user error as its one-line message, without the traceback; and no credential (a
    ``user:password@`` in a URI) in any flow or task log line, the console's or the Prefect API's."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and user_error(record.exc_info[1]) is not None:
            record.exc_info, record.exc_text = None, None
        message = record.getMessage()
        clean = redact_credentials(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None:  # the traceback's text, once formatted
            text = redact_credentials("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info, record.exc_text = None, text
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_OneLineUserErrors())


def _stage_task(stage: str):
    return task(name=stage, task_run_name=task_run_namer(stage), retries=RETRIES,
                retry_delay_seconds=exponential_backoff(backoff_factor=RETRY_BACKOFF_S),
                retry_jitter_factor=RETRY_JITTER, cache_key_fn=_cache_key(stage),
                retry_condition_fn=_retry_unless_user_error, persist_result=True,
                result_serializer="json", log_prints=True)


def _run(stage: str, cfg, run_dir: str, *inputs: dict) -> dict:
    """The stage, its progress reported to the UI while it runs, and its summary artifact."""
    with progress.reporting(get_run_logger()):
        res = STAGE[stage].module.run(cfg, Path(run_dir), *inputs)
    _publish(res)
    return res


@_stage_task("validate")
def validate(cfg, run_dir: str) -> dict:
    return _run("validate", cfg, run_dir)


@_stage_task("precompute")
def precompute(cfg, run_dir: str, validated: dict) -> dict:
    return _run("precompute", cfg, run_dir, validated)


@_stage_task("train")
def train(cfg, run_dir: str, validated: dict, precomputed: dict) -> dict:
    res = _run("train", cfg, run_dir, validated, precomputed)
    artifacts.publish_mlflow_run(cfg, res)
    return res


@_stage_task("evaluate")
def evaluate(cfg, run_dir: str, validated: dict, precomputed: dict, trained: dict) -> dict:
    res = _run("evaluate", cfg, run_dir, validated, precomputed, trained)
    artifacts.publish_plots(cfg, trained, res)
    if Path(res.get("samples", "")).is_file():
        table = pd.read_json(res["samples"], lines=True).head(50)
        if not table.empty:
            create_table_artifact(key="dpo-evaluate-samples", table=table.astype(str).to_dict("records"),
                                  description="held-out prompts: policy vs reference responses")
    return res


@_stage_task("register")
def register(cfg, run_dir: str, validated: dict, trained: dict, evaluated: dict) -> dict:
    res = _run("register", cfg, run_dir, validated, trained, evaluated)
    artifacts.publish_model_version(cfg, res)
    return res
