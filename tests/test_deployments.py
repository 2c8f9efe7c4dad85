"""The deployments users run: `dpo serve`'s two served deployments and deployments/prefect.yaml
(entrypoints load, parameters fit the flow and load as configs, the nightly schedule, one run at
a time)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_served_deployments_schedule_and_limits(dpo_home):
    from data_contracts.config import load_config
    from dpo_engine.sweep import expand_grid
    from flows.deployments import NIGHTLY_CRON, served_deployments

    assert NIGHTLY_CRON == "0 2 * * *"
    full, sweep = served_deployments(str(ROOT / "configs" / "default.yaml"))
    assert (full.name, sweep.name) == ("full", "sweep")
    assert full.flow_name == sweep.flow_name == "dpo"
    (sched,) = full.schedules
    assert sched.schedule.cron == "0 2 * * *" and sched.schedule.timezone == "UTC"
    assert sched.parameters["overrides"] == {"registry.skip_unchanged": True}  # skip when nothing new
    assert not sweep.schedules
    for dep in (full, sweep):
        assert dep.concurrency_limit == 1
        assert Path(dep.parameters["config"]).is_file()
    cfg = load_config(sweep.parameters["config"])
    assert len(expand_grid(sweep.parameters["grid"])) == 3 and cfg.registry.enabled


def test_prefect_yaml_deployments_fit_the_flow(dpo_home):
    from prefect.flows import load_flow_from_entrypoint

    from data_contracts.config import load_config
    from dpo_engine.sweep import expand_grid

    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"full", "sweep"}
    for name, dep in deps.items():
        path, _, fn = dep["entrypoint"].partition(":")
        flow = load_flow_from_entrypoint(str(ROOT / path) + ":" + fn)
        assert flow.name == "dpo"
        params = flow.validate_parameters(dep["parameters"])  # names and types the flow takes
        cfg = load_config(str(ROOT / params["config"]), params.get("overrides"))
        assert cfg.registry.enabled, name
        assert dep["work_pool"]["name"] == "dpo-process"
        for sched in dep.get("schedules") or []:
            flow.validate_parameters(sched["parameters"])
            load_config(str(ROOT / sched["parameters"]["config"]), sched["parameters"]["overrides"])
    full = deps["full"]
    assert full["concurrency_limit"] == 1
    (sched,) = full["schedules"]
    assert (sched["cron"], sched["timezone"]) == ("0 2 * * *", "UTC")
    assert sched["parameters"]["overrides"]["registry.skip_unchanged"] is True
    assert len(expand_grid(deps["sweep"]["parameters"]["grid"])) == 3


def test_prefect_yaml_matches_the_one_definition():
    """deployments/prefect.yaml and `dpo serve` deploy the same thing: flows/deployments.py."""
    from flows.deployments import prefect_yaml_problems

    assert prefect_yaml_problems(ROOT / "deployments" / "prefect.yaml") == []
