"""Names the Prefect UI lists: a flow run is named after its run folder (known once the flow made it),
a stage's task run after the stage and what it works on ("validate train+eval", "precompute eval",
"train", "evaluate heldout", "register tiny-e2e"), with the run folder added when it is not the flow
run's own (a sweep variant's "train sw-01")."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext

from data_contracts.helpers import redact_credentials
from dpo_engine.stages.table import STAGE

log = logging.getLogger(__name__)


def current_flow_run_name() -> str | None:
    ctx = FlowRunContext.get()
    return ctx.flow_run.name if ctx is not None and ctx.flow_run is not None else None


def name_flow_run(name: str) -> bool:
    """Rename the flow run this code runs in to ``name`` (the run folder's name), on the API and in
    its context. Outside a flow run, or when the API refuses, nothing changes (said in a warning):
    a name is never worth failing a run for."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or ctx.flow_run.name == name:
        return False
    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_name(ctx.flow_run.id, name).raise_for_status()
    except Exception as e:  # noqa: BLE001
        log.warning("could not name the flow run %r: %s", name, redact_credentials(f"{type(e).__name__}: {e}"))
        return False
    ctx.flow_run.name = name
    return True


def _what(stage: str, cfg) -> str:
    if stage == "validate":  # preflight makes every run hold out an eval split
        return "train+eval"
    if stage == "precompute":
        return "+".join(STAGE["precompute"].module.splits(cfg))
    if stage == "evaluate":
        return "heldout"
    if stage == "register":
        return cfg.registry.model_name
    return ""


def stage_run_name(stage: str, parameters: dict[str, Any]) -> str:
    """A stage task run's name from its parameters (``cfg``, ``run_dir``)."""
    try:
        name = " ".join(p for p in (stage, _what(stage, parameters["cfg"])) if p)
        folder = Path(parameters["run_dir"]).name
    except Exception:  # noqa: BLE001 - a name only: the stage's own name will do
        return stage
    return name if folder == current_flow_run_name() else f"{name} {folder}"


def task_run_namer(stage: str) -> Callable[..., str]:
    """The ``task_run_name`` callable of ``stage``'s task (Prefect passes it the call's parameters)."""
    def name(parameters: dict[str, Any]) -> str:
        return stage_run_name(stage, parameters)

    return name
