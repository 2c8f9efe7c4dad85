"""The one definition of the deployments users run: ``dpo/full`` (the five-stage flow, nightly,
skipped when nothing changed) and ``dpo-sweep/sweep`` (the grid sweep flow, whose form shows the grid,
metric, parallel and stop settings). ``dpo serve`` serves them (:func:`served_deployments`), and
``deployments/prefect.yaml`` / ``deployments/prefect.git.yaml`` (for work pools) are checked against
them (:func:`prefect_yaml_problems`)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

NIGHTLY_CRON = "0 2 * * *"  # UTC
SWEEP_GRID = {"loss.beta": [0.05, 0.1, 0.2]}  # default grid of the dpo-sweep/sweep deployment

# name -> what the deployment runs; "config" is added by whoever deploys it (a path on that machine)
DEPLOYMENTS: dict[str, dict[str, Any]] = {
    "full": {
        "entrypoint": "flows/dpo.py:dpo", "flow_name": "dpo",
        "description": "DPO pipeline: validate, precompute reference log-probs, train, evaluate, register",
        "parameters": {},
        # scheduled runs end early ("skipped: nothing new") when data and config are unchanged
        "schedule": {"cron": NIGHTLY_CRON, "timezone": "UTC",
                     "overrides": {"registry.skip_unchanged": True}},
        "concurrency_limit": 1,
    },
    "sweep": {
        "entrypoint": "flows/sweep.py:dpo_sweep", "flow_name": "dpo-sweep",
        "description": "DPO grid sweep: each variant a child MLflow run, only the best registered",
        "parameters": {"grid": SWEEP_GRID, "parallel": 1, "stop_margin": None,
                       "stop_metric": "eval/rewards/accuracies"},
        "schedule": None,
        "concurrency_limit": 1,
    },
}


def deployment_flow(name: str):
    """The flow object deployment ``name`` runs (imported from its entrypoint)."""
    path, _, fn = DEPLOYMENTS[name]["entrypoint"].partition(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), fn)


def served_deployments(config: str | None, cron: str = NIGHTLY_CRON) -> list:
    """What ``dpo serve`` serves: :data:`DEPLOYMENTS`, with ``config`` as their config file and the
    nightly schedule at ``cron`` (UTC)."""
    # lazy: the CLI's parser reads this module's constants, and `dpo --help` should not load the engine
    from prefect.schedules import Cron

    params = {"config": str(Path(config).resolve())} if config else {}
    out = []
    for name, spec in DEPLOYMENTS.items():
        schedules = []
        if spec["schedule"]:
            s = spec["schedule"]
            schedules = [Cron(cron, timezone=s["timezone"],
                              parameters={**params, "overrides": s["overrides"]})]
        out.append(deployment_flow(name).to_deployment(
            name=name, schedules=schedules, parameters={**params, **spec["parameters"]},
            concurrency_limit=spec["concurrency_limit"], description=spec["description"]))
    return out


def prefect_yaml_problems(path: str | Path) -> list[str]:
    """How the prefect.yaml at ``path`` differs from :data:`DEPLOYMENTS` (empty: same deployments,
    entrypoints, parameters, schedule and concurrency) and from the installed Prefect
    (``prefect-version``)."""
    import prefect

    spec = yaml.safe_load(Path(path).read_text())
    found = {d["name"]: d for d in spec.get("deployments") or []}
    problems = [] if str(spec.get("prefect-version")) == prefect.__version__ else \
        [f"prefect-version {spec.get('prefect-version')}, installed {prefect.__version__}"]
    problems += [f"deployment {n!r}: missing" for n in DEPLOYMENTS if n not in found]
    problems += [f"deployment {n!r}: not defined in flows/deployments.py" for n in found if n not in DEPLOYMENTS]
    for name, want in DEPLOYMENTS.items():
        dep = found.get(name)
        if dep is None:
            continue
        if dep.get("entrypoint") != want["entrypoint"]:
            problems.append(f"{name}: entrypoint {dep.get('entrypoint')!r}, not {want['entrypoint']!r}")
        params = {k: v for k, v in (dep.get("parameters") or {}).items() if k != "config"}
        if params != want["parameters"]:
            problems.append(f"{name}: parameters {params}, not {want['parameters']}")
        if dep.get("concurrency_limit") != want["concurrency_limit"]:
            problems.append(f"{name}: concurrency_limit {dep.get('concurrency_limit')}")
        if dep.get("description") != want["description"]:
            problems.append(f"{name}: description {dep.get('description')!r}")
        scheds = dep.get("schedules") or []
        s = want["schedule"]
        if s is None:
            if scheds:
                problems.append(f"{name}: has a schedule, the served deployment has none")
            continue
        got = [(x.get("cron"), x.get("timezone"), (x.get("parameters") or {}).get("overrides")) for x in scheds]
        if got != [(s["cron"], s["timezone"], s["overrides"])]:
            problems.append(f"{name}: schedules {got}, not {[(s['cron'], s['timezone'], s['overrides'])]}")
    return problems
