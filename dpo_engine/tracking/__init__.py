"""MLflow tracking and model registry for DPO runs (pure library, no Prefect).

- :mod:`~dpo_engine.tracking.client`: the MLflow client, retries of an unreachable store, ``connect``
- :mod:`~dpo_engine.tracking.runs`: experiments, runs, and logging params, metrics, tags, artifacts
- :mod:`~dpo_engine.tracking.outbox`: writes buffered on disk until the store answers
- :mod:`~dpo_engine.tracking.packaging`: a Hugging Face folder (full or adapter) as an MLflow model
- :mod:`~dpo_engine.tracking.vision_model`: a vision-language model as a pyfunc (image + prompt -> text)
- :mod:`~dpo_engine.tracking.registration`: model versions, the promotion gate, aliases
- :mod:`~dpo_engine.tracking.loading`: a registered version back as a folder or (model, tokenizer)
- :mod:`~dpo_engine.tracking.compare`: runs side by side (table and PNG)

This module re-exports what the rest of the project uses.
"""

from dpo_engine.tracking.client import RetryPolicy, TrackingUnavailable, connect
from dpo_engine.tracking.compare import compare_plot, compare_runs
from dpo_engine.tracking.loading import download_hf_folder, load_registered
from dpo_engine.tracking.outbox import Outbox
from dpo_engine.tracking.packaging import adapter_base, model_format
from dpo_engine.tracking.registration import champion, register_model, version_metric
from dpo_engine.tracking.runs import (
    end_run,
    log_dict,
    log_metrics,
    log_params,
    log_table,
    metric_histories,
    set_tags,
    start_run,
    win_rate,
)

__all__ = [
    "Outbox",
    "RetryPolicy",
    "TrackingUnavailable",
    "adapter_base",
    "champion",
    "compare_plot",
    "compare_runs",
    "connect",
    "download_hf_folder",
    "end_run",
    "load_registered",
    "log_dict",
    "log_metrics",
    "log_params",
    "log_table",
    "metric_histories",
    "model_format",
    "register_model",
    "set_tags",
    "start_run",
    "version_metric",
    "win_rate",
]
