"""The deployments users run: `dpo serve`'s two served deployments (dpo/full of the five-stage flow,
dpo-sweep/sweep of the sweep flow) and deployments/prefect.yaml / prefect.git.yaml (entrypoints load,
parameters fit the flows and load as configs, the nightly schedule, one run at a time, the installed
Prefect's version, a git_clone pull that runs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILES = ("prefect.yaml", "prefect.git.yaml")


def test_served_deployments_schedule_and_limits(dpo_home):
    from data_contracts.config import load_config
    from dpo_engine.sweep import expand_grid
    from flows.deployments import NIGHTLY_CRON, served_deployments

    assert NIGHTLY_CRON == "0 2 * * *"
    full, sweep = served_deployments(str(ROOT / "configs" / "default.yaml"))
    assert (full.name, sweep.name) == ("full", "sweep")
    assert (full.flow_name, sweep.flow_name) == ("dpo", "dpo-sweep")
    (sched,) = full.schedules
    assert sched.schedule.cron == "0 2 * * *" and sched.schedule.timezone == "UTC"
    assert sched.parameters["overrides"] == {"registry.skip_unchanged": True}  # skip when nothing new
    assert not sweep.schedules
    for dep in (full, sweep):
        assert dep.concurrency_limit == 1
        assert Path(dep.parameters["config"]).is_file()
    cfg = load_config(sweep.parameters["config"])
    assert len(expand_grid(sweep.parameters["grid"])) == 3 and cfg.registry.enabled


def test_full_form_shows_a_run_and_the_sweep_form_its_settings(dpo_home):
    """The UI's forms are the deployments' parameter schemas: dpo/full takes only what a full run
    takes; dpo-sweep/sweep has the grid, metric, parallel and stop settings, typed and described."""
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    from flows.deployments import served_deployments

    full, sweep = served_deployments(None)
    props = full._parameter_openapi_schema.properties
    assert set(props) == {"config", "overrides", "run_name"}
    schema = sweep._parameter_openapi_schema
    props = schema.properties
    assert set(props) == {"grid", "metric", "parallel", "stop_margin", "stop_metric", "stop_mode", "workers",
                          "config", "overrides", "run_name"}
    assert schema.required == ["grid"]
    assert {t.get("type") for t in props["grid"]["anyOf"]} == {"object", "array"}
    assert props["parallel"]["type"] == "integer" and props["parallel"]["default"] == 1
    assert props["workers"]["type"] == "boolean"
    assert {"type": "number"} in props["stop_margin"]["anyOf"]
    assert {"enum": ["max", "min"], "type": "string"} in props["stop_mode"]["anyOf"]
    assert all(p.get("description") for p in props.values()), props  # the form says what each is
    # `prefect deploy` reads the schema from the source file: the same form
    from_source = parameter_schema_from_entrypoint(str(ROOT / "flows" / "sweep.py") + ":dpo_sweep")
    assert set(from_source.properties) == set(props) and from_source.required == ["grid"]
    assert {"enum": ["max", "min"], "type": "string"} in from_source.properties["stop_mode"]["anyOf"]


@pytest.mark.parametrize("name", PREFECT_FILES)
def test_prefect_yaml_deployments_fit_the_flow(dpo_home, name):
    from prefect.flows import load_flow_from_entrypoint

    from data_contracts.config import load_config
    from dpo_engine.sweep import expand_grid

    spec = yaml.safe_load((ROOT / "deployments" / name).read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"full", "sweep"}
    flows = {}
    for dep_name, dep in deps.items():
        path, _, fn = dep["entrypoint"].partition(":")
        flow = flows[dep_name] = load_flow_from_entrypoint(str(ROOT / path) + ":" + fn)
        params = flow.validate_parameters(dep["parameters"])  # names and types the flow takes
        cfg = load_config(str(ROOT / params["config"]), params.get("overrides"))
        assert cfg.registry.enabled, dep_name
        assert dep["work_pool"]["name"] == "dpo-process"
        for sched in dep.get("schedules") or []:
            flow.validate_parameters(sched["parameters"])
            load_config(str(ROOT / sched["parameters"]["config"]), sched["parameters"]["overrides"])
    assert (flows["full"].name, flows["sweep"].name) == ("dpo", "dpo-sweep")
    full = deps["full"]
    assert full["concurrency_limit"] == 1
    (sched,) = full["schedules"]
    assert (sched["cron"], sched["timezone"]) == ("0 2 * * *", "UTC")
    assert sched["parameters"]["overrides"]["registry.skip_unchanged"] is True
    assert len(expand_grid(deps["sweep"]["parameters"]["grid"])) == 3


@pytest.mark.parametrize("name", PREFECT_FILES)
def test_prefect_yaml_matches_the_one_definition(name, tmp_path):
    """Both prefect files and `dpo serve` deploy the same thing: flows/deployments.py, with the
    installed Prefect's version."""
    import prefect

    from flows.deployments import prefect_yaml_problems

    assert prefect_yaml_problems(ROOT / "deployments" / name) == []
    stale = (ROOT / "deployments" / name).read_text().replace(f"prefect-version: {prefect.__version__}",
                                                                "prefect-version: 3.0.0")
    (bad := tmp_path / name).write_text(stale)
    assert prefect_yaml_problems(bad) == [f"prefect-version 3.0.0, installed {prefect.__version__}"]


def _run_pull_steps(steps: list[dict]) -> dict:
    """Prefect's pull steps as ``run_steps`` runs them (each step's inputs templated with the outputs
    of the steps before it, a step's output also kept under its ``id``), without the API calls that
    resolve block and variable references (these steps hold none)."""
    from prefect.utilities.importtools import import_object
    from prefect.utilities.templating import apply_values

    outputs: dict = {}
    for step in steps:
        ((fqn, inputs),) = step.items()
        inputs = dict(inputs)
        step_id = inputs.pop("id", None)
        out = import_object(fqn)(**apply_values(inputs, outputs))
        if isinstance(out, dict):
            outputs.update(out)
            if step_id:
                outputs[step_id] = out
    return outputs


def test_git_clone_pull_steps_clone_and_enter_the_repository(tmp_path, monkeypatch):
    """deployments/prefect.git.yaml's pull steps, as a worker runs them, against a local repository:
    the clone is made and becomes the working directory, with the entrypoints in it."""
    repo = tmp_path / "repo"
    (repo / "flows").mkdir(parents=True)
    (repo / "flows" / "dpo.py").write_text("# entrypoint\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)

    steps = yaml.safe_load((ROOT / "deployments" / "prefect.git.yaml").read_text())["pull"]
    (clone,) = [s["prefect.deployments.steps.git_clone"] for s in steps if "prefect.deployments.steps.git_clone" in s]
    assert clone["repository"].startswith("https://") and clone["branch"] == "main"
    clone["repository"] = repo.as_uri()
    work = tmp_path / "worker"
    work.mkdir()
    monkeypatch.chdir(work)
    out = _run_pull_steps(steps)
    assert Path.cwd().resolve() == (work / out["clone"]["directory"]).resolve() != work.resolve()
    assert (Path.cwd() / "flows" / "dpo.py").is_file()
