"""A run's validated splits as MLflow datasets: what the MLflow UI shows as the run's inputs.

Each split (``train``, ``eval``) of the validate stage's result becomes one dataset input: named by
its source (a file, a hub id, ``builtin:answer-format``; an eval split held out of the train source
is ``<source>#eval``), the split's content fingerprint as digest, the source again as the dataset's
source, a schema read from ``valid.parquet``'s footer and a profile of its row counts, and the
context MLflow's UI groups by (``training``, ``evaluation``). Described here as plain JSON-able dicts
so the outbox can keep them on disk; :func:`dpo_engine.tracking.runs.dataset_inputs` makes MLflow
entities of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

from data_contracts.helpers import redact_credentials

BUILTIN_PREFIX = "builtin:"  # data_contracts.config.BUILTIN_DATASET and any later builtin set
DIGEST_LEN = 32  # MLflow stores at most 36 characters of a dataset digest: the fingerprint's first 32 hex
MAX_NAME_LEN = 500  # mlflow.utils.validation.MAX_DATASET_NAME_SIZE
CONTEXTS = {"train": "training", "eval": "evaluation"}  # split -> MLflow's mlflow.data.context tag
FINGERPRINT_TAG = "dpo.fingerprint"  # the whole sha256 of the split, beside the digest


def source_description(source: str) -> tuple[str, str]:
    """(MLflow source type, source JSON) of a data source as MLflow's own dataset sources spell
    them: ``local`` (``{"uri": path}``), ``http`` (``{"url": ...}``), another URL scheme such as
    ``s3`` (``{"uri": ...}``), ``hugging_face`` (``{"path": hub id}``), ``builtin`` (ours).
    Credentials in a URL are redacted."""
    source = redact_credentials(source)
    scheme = urlparse(source).scheme
    if source.startswith(BUILTIN_PREFIX):
        return "builtin", json.dumps({"uri": source})
    if scheme in ("http", "https"):
        return "http", json.dumps({"url": source})
    if len(scheme) > 1 and "://" in source:  # s3://, gs://, hf:// ... (a Windows drive letter is not one)
        return scheme, json.dumps({"uri": source})
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")):
        return "local", json.dumps({"uri": str(path.resolve())})
    return "hugging_face", json.dumps({"path": source})


def _col_type(t):
    """The MLflow type of an Arrow column type, or None for one without a plain equivalent."""
    import pyarrow as pa
    from mlflow.types import DataType
    from mlflow.types.schema import Array

    if pa.types.is_list(t) or pa.types.is_large_list(t):
        item = _col_type(t.value_type)
        return Array(item) if item is not None else None
    for test, dtype in ((pa.types.is_string, DataType.string), (pa.types.is_large_string, DataType.string),
                        (pa.types.is_boolean, DataType.boolean), (pa.types.is_int64, DataType.long),
                        (pa.types.is_integer, DataType.integer), (pa.types.is_float32, DataType.float),
                        (pa.types.is_floating, DataType.double), (pa.types.is_binary, DataType.binary),
                        (pa.types.is_large_binary, DataType.binary), (pa.types.is_timestamp, DataType.datetime)):
        if test(t):
            return dtype
    return None


def parquet_schema(path: str | Path) -> str | None:
    """The MLflow schema JSON (``{"mlflow_colspec": [...]}``, as MLflow's pandas datasets log it) of
    a Parquet file, read from its footer only; None when the file cannot be read or a column has no
    MLflow type."""
    import pyarrow.parquet as pq
    from mlflow.types import ColSpec, Schema

    try:
        arrow = pq.read_schema(path)
    except (OSError, ValueError):
        return None
    cols = []
    for field in arrow:
        t = _col_type(field.type)
        if t is None:
            return None
        cols.append(ColSpec(t, field.name))
    return json.dumps({"mlflow_colspec": Schema(cols).to_dict()})


def split_inputs(validated: dict) -> list[dict]:
    """The validate stage's splits (``validated``: its result) as dataset input descriptions:
    ``{name, digest, source_type, source, schema, profile, tags}``."""
    sources = validated.get("sources") or {}
    out = []
    for split, context in CONTEXTS.items():
        s = validated.get(split)
        if not s or not s.get("fingerprint"):
            continue
        source = sources.get(split)
        name = source
        if source is None:  # held out of the train source (data.eval_fraction)
            source = sources.get("train") or ""
            name = f"{source}#{split}"
        source_type, source_json = source_description(source)
        profile = {"num_rows": s.get("rows"), "rows_in": s.get("rows_in"), "rejected": s.get("rejected")}
        out.append({"name": redact_credentials(name)[:MAX_NAME_LEN], "digest": s["fingerprint"][:DIGEST_LEN],
                    "source_type": source_type, "source": source_json,
                    "schema": parquet_schema(s["valid"]) if s.get("valid") else None,
                    "profile": json.dumps({k: v for k, v in profile.items() if v is not None}),
                    "context": context, "tags": {FINGERPRINT_TAG: s["fingerprint"]}})
    return out
