"""The course of a sweep, apart from where its stages run (that is Prefect composition,
``flows/sweep.py``): the variants' configs, each prepared once; the sweep's jobs; which variants the
winner is chosen among; the summary.

Imported by its module path (not re-exported by :mod:`dpo_engine.sweep`): it builds on the pipeline,
whose train stage itself imports the sweep's stop rule."""

from __future__ import annotations

import datetime as dt
import os
import socket
from pathlib import Path
from typing import Any

from data_contracts.config import RunConfig
from dpo_engine.pipeline import prepare
from dpo_engine.sweep.early_stop import check_stop_configs


def sweep_name(run_name: str | None) -> str:
    """The sweep's name: ``run_name``, else ``sweep-<UTC time>``."""
    return run_name or "sweep-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


def variant_overrides(overrides: dict[str, Any] | None, name: str, variants: list[dict]) -> list[dict]:
    """The overrides of the sweep's base run (validation, precompute) and of each variant, in order."""
    base = {**(overrides or {}), "run_name": name}
    return [base] + [{**(overrides or {}), **v, "run_name": f"{name}-{i:02d}"} for i, v in enumerate(variants)]


def variant_configs(config: str | None, overrides: dict[str, Any] | None, name: str, variants: list[dict],
                    stop: dict | None, *, hand_over: bool = False) -> tuple[RunConfig, list[RunConfig]]:
    """The base config and each variant's, each prepared (loaded and preflighted: a variant may name
    its own files) once; ``hand_over``: for the flow started next in this process."""
    base, *cfgs = [prepare(config, o, hand_over=hand_over) for o in variant_overrides(overrides, name, variants)]
    if stop:
        check_stop_configs(cfgs)
    return base, cfgs


def where() -> str:
    """Where a variant ran: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def candidates(rows: list[dict]) -> tuple[list[int], list[int]]:
    """(variants the winner is chosen among, variants to evaluate before choosing). A variant stopped
    early never wins while another ran to the end; when every variant stopped, all are evaluated
    and compared."""
    ok = [i for i, r in enumerate(rows) if not r.get("error")]  # a failed variant is never chosen
    running = [i for i in ok if not rows[i]["stop_reason"]]
    if running:
        return running, []
    return ok, ok


def summary(sweep_dir: str, rows: list[dict], best: int, metric: str, *, parent: str, parallel: int,
            workers: bool, stop: dict | None, board: Path | None, precomputes: int, registered: dict) -> dict:
    """The sweep's ``summary.json`` content: every variant's overrides, run, status and metric, the best."""
    metrics = [r["evaluated"]["metrics"] if r["evaluated"] else {} for r in rows]
    return {
        "run_dir": sweep_dir, "status": "completed", "mlflow_parent_run_id": parent, "metric": metric,
        "parallel": parallel, "workers": workers, **(stop or {}), "board": str(board) if board else None,
        "precomputes": precomputes, "best": best, "best_value": metrics[best][metric],
        "failed": sum(1 for r in rows if r.get("error")),
        "variants": [{"overrides": r["variant"], "run_dir": r["run_dir"],
                      "mlflow_run_id": (r["trained"] or {}).get("mlflow_run_id"),
                      "steps": (r["trained"] or {}).get("steps"),
                      "status": "failed" if r.get("error") else r["stop_reason"] or "completed",
                      **({"error": r["error"]} if r.get("error") else {}), "ran_on": r["ran_on"],
                      metric: m.get(metric)} for r, m in zip(rows, metrics)],
        "registered_model": registered.get("model_name"), "registered_version": registered.get("version"),
        "aliases": registered.get("aliases"), "gate_passed": registered.get("gate_passed"),
    }


def summary_line(summary: dict, rows: list[dict], registered: dict) -> str:
    """One line: the best variant, how many stopped early, what was registered."""
    best, metric = summary["best"], summary["metric"]
    n_stopped = sum(1 for r in rows if r["stop_reason"])
    n_failed = sum(1 for r in rows if r.get("error"))
    return (f"sweep: best of {len(rows)} by {metric}: variant {best} {rows[best]['variant']} "
            f"({summary['best_value']:.4g}){f'; {n_stopped} stopped early' if n_stopped else ''}"
            f"{f'; {n_failed} failed' if n_failed else ''}; "
            f"{registered.get('summary', '')}")
