"""Prefect result records are read as JSON only: a record (a task's persisted result, or the stored
parameters a task worker reads) that names another serializer, pickle above all, is refused, since
loading it would run whatever code the file's writer chose. Prefect writes JSON here
(``PREFECT_RESULTS_DEFAULT_SERIALIZER=json`` in :func:`data_contracts.state.local_state_env`, and
``result_serializer="json"`` on the persisted tasks, :data:`SERIALIZER` for background tasks, whose
stored parameters carry their parent flow as a reference); this module makes reading match.

A JSON record is decoded with the standard library, its ``jsonlib``/``object_decoder`` settings
ignored; the typed objects Prefect's JSON encoder writes (``{"__class__": ..., "data": ...}``) are
rebuilt only for :data:`ALLOWED_CLASSES` and Prefect's own, exceptions only of the project's or the builtin ones.
:func:`install` patches :class:`prefect.results.ResultRecord`'s two readers; importing ``tasks``
installs it, in the flow process and in every task worker.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.serializers import JSONSerializer, prefect_json_object_decoder, prefect_json_object_encoder

# typed objects rebuilt (by Prefect's decoder: pydantic validation of the stored data, no code of the
# record's choosing): the project's config, paths, and what Prefect's own stored context holds
ALLOWED_CLASSES = frozenset({"pathlib.Path", "pathlib.PosixPath", "pathlib.PurePosixPath", "uuid.UUID",
                             "datetime.datetime", "datetime.date", "datetime.timedelta", "builtins.set",
                             "builtins.frozenset", "builtins.tuple", "builtins.bytes",
                             "data_contracts.config.run.RunConfig"})
ALLOWED_CLASS_MODULES = ("prefect.",)
ALLOWED_EXCEPTION_MODULES = ("builtins.", "data_contracts.", "dpo_engine.", "prefect.")
# flows a task worker may be handed (a background task's stored context names its parent flow)
ALLOWED_FLOWS = frozenset({"flows.dpo.dpo", "flows.sweep.dpo_sweep"})


class UnsafeResultError(ValueError):
    """A Prefect result record this project will not load."""


def encode_object(obj: Any) -> Any:
    """The JSON encoder of :data:`SERIALIZER`: a Prefect flow as a reference to its module-level name
    (a background task's stored context holds its parent flow), anything else as Prefect encodes it."""
    from prefect.flows import Flow

    if isinstance(obj, Flow):
        return {"__flow__": f"{obj.fn.__module__}.{obj.fn.__name__}"}
    return prefect_json_object_encoder(obj)


SERIALIZER = JSONSerializer(object_encoder=f"{__name__}.encode_object")


def _flow(ref: str) -> Any:
    if ref not in ALLOWED_FLOWS:
        raise UnsafeResultError(f"refused a Prefect result record naming the flow {ref!r}")
    module, _, name = ref.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _object_hook(obj: dict) -> Any:
    if "__flow__" in obj:
        return _flow(str(obj["__flow__"]))
    name = obj.get("__class__")
    if name is not None and name not in ALLOWED_CLASSES and not str(name).startswith(ALLOWED_CLASS_MODULES):
        raise UnsafeResultError(f"refused a Prefect result record holding a {name!r} object (only "
                                "Prefect's, paths, dates, UUIDs and the run config are rebuilt)")
    exc = obj.get("__exc_type__")
    if exc is not None and not str(exc).startswith(ALLOWED_EXCEPTION_MODULES):
        raise UnsafeResultError(f"refused a Prefect result record holding an exception of type {exc!r}")
    return prefect_json_object_decoder(obj) if (name or exc) else obj


def json_loads(blob: bytes | str) -> Any:
    """A JSON record's value, rebuilt without running code named by the record."""
    return json.loads(blob.decode() if isinstance(blob, bytes) else blob, object_hook=_object_hook)


def _require_json(metadata: ResultRecordMetadata, where: str) -> None:
    kind = getattr(metadata.serializer, "type", None)
    if kind != "json":
        raise UnsafeResultError(f"refused a Prefect result record{where} serialized with {kind!r}: only "
                                "JSON records are read (a pickle would run code); re-run the producing "
                                "task with this version, which writes JSON")


def _deserialize(cls, data: bytes, backup_serializer=None) -> ResultRecord:
    try:
        outer = json.loads(data)
        metadata = ResultRecordMetadata.model_validate(outer["metadata"])
    except (ValueError, KeyError, TypeError):
        raise UnsafeResultError("refused a Prefect result record that is not a JSON record") from None
    where = f" {metadata.storage_key}" if metadata.storage_key else ""
    _require_json(metadata, where)
    result = outer.get("result")
    value = json_loads(result) if isinstance(result, str) else result
    return cls(metadata=metadata.model_copy(update={"serializer": JSONSerializer()}), result=value)


def _deserialize_parts(cls, result: bytes, metadata: bytes) -> ResultRecord:
    meta = ResultRecordMetadata.load_bytes(metadata)
    _require_json(meta, f" {meta.storage_key}" if meta.storage_key else "")
    return cls(metadata=meta.model_copy(update={"serializer": JSONSerializer()}), result=json_loads(result))


def install() -> None:
    """Route Prefect's record readers through the JSON-only ones (idempotent)."""
    ResultRecord.deserialize = classmethod(_deserialize)
    ResultRecord.deserialize_from_result_and_metadata = classmethod(_deserialize_parts)
