"""What the Prefect UI shows of a run, read back through the Prefect API (the temporary local API the
flows run on: one server for this module's tests): the flow run named after the run folder, task runs
named by stage and split, training and precompute progress while they run (a progress artifact
updated at every logging step, a log line each time), links to the MLflow run, the registered
version and the plots; the sweep flow's form, run name and leaderboard; retries that back off."""

from __future__ import annotations

import json
import time
from pathlib import Path
from uuid import UUID

import pytest

from sweep_fakes import fake_sweep
from tiny import tiny_model_dir


@pytest.fixture(autouse=True)
def _slow_server_start():
    import flows  # noqa: F401  (the project-local Prefect state, before prefect is imported)
    import prefect.settings as ps

    with ps.temporary_settings(updates={ps.PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        yield


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _eventually(read, ok, timeout_s: float = 60.0):
    """``read()`` until ``ok`` holds of it: task runs, their states and logs reach the API's database
    through events and batches, a moment after the flow returned."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def _task_runs(flow_run_id: UUID) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as c:
        return c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def _artifacts(flow_run_id: UUID) -> dict[str, list]:
    """The flow run's artifacts by key (oldest first)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as c:
        found = c.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    out: dict[str, list] = {}
    for a in sorted(found, key=lambda a: a.created):
        out.setdefault(a.key, []).append(a)
    return out


def _logs(flow_run_id: UUID) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with _client() as c:
        logs = c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


@pytest.fixture
def progress_spy(monkeypatch):
    """Every progress artifact write the tasks make: (stage key or artifact id, percent)."""
    import tasks.progress as tp

    writes: list[tuple[str, float]] = []
    create, update = tp.create_progress_artifact, tp.update_progress_artifact

    def spy_create(progress, key=None, description=None):
        artifact_id = create(progress, key=key, description=description)
        writes.append((key, progress))
        keys[artifact_id] = key
        return artifact_id

    def spy_update(artifact_id, progress, description=None):
        writes.append((keys[artifact_id], progress))
        return update(artifact_id, progress, description=description)

    keys: dict = {}
    monkeypatch.setattr(tp, "create_progress_artifact", spy_create)
    monkeypatch.setattr(tp, "update_progress_artifact", spy_update)
    return writes


def test_a_run_in_the_prefect_ui(dpo_home, tmp_path, progress_spy):
    from mlflow import MlflowClient

    from data_contracts.state import mlflow_uri
    from dpo_engine import tracking
    from flows.dpo import dpo

    overrides = {"model.name_or_path": str(tiny_model_dir(tmp_path / "tiny")), "data.train_limit": 12,
                 "data.eval_limit": 6, "data.max_length": 256, "train.per_device_train_batch_size": 4,
                 "train.max_steps": 3, "train.logging_steps": 1, "train.learning_rate": 1e-3,
                 "eval.num_prompts": 2, "eval.max_new_tokens": 4, "eval.batch_size": 4, "reference.batch_size": 4,
                 "registry.experiment": "ui-test", "registry.model_name": "tiny-ui", "registry.gate.thresholds": {}}
    state = dpo(overrides=overrides, return_state=True)  # no run name: the folder's name is made in the flow
    summary, flow_run_id = state.result(), state.state_details.flow_run_id
    run_id, folder = summary["mlflow_run_id"], Path(summary["run_dir"]).name

    with _client() as c:
        assert c.read_flow_run(flow_run_id).name == folder  # e.g. 20250101-020000-1a2b3c
    names = _eventually(lambda: sorted(r.name for r in _task_runs(flow_run_id)), lambda n: len(n) == 5)
    assert names == sorted(["validate train+eval", "precompute train+eval", "train", "evaluate heldout",
                            "register tiny-ui"])

    # progress while training ran: an artifact write at every logging step (3 steps), the last at 100%
    train = [pct for key, pct in progress_spy if key == "dpo-train-progress"]
    assert train == pytest.approx([100 / 3, 200 / 3, 100.0])
    assert [pct for key, pct in progress_spy if key == "dpo-precompute-train-progress"][-1] == 100.0
    art = _artifacts(flow_run_id)
    for key in ("dpo-train-progress", "dpo-precompute-train-progress", "dpo-precompute-eval-progress"):
        (progress,) = art[key]
        assert progress.type == "progress" and progress.data == 100.0, key
    assert art["dpo-train-progress"][0].description.startswith("train: step 3/3 (100%), loss ")
    logs = _eventually(lambda: _logs(flow_run_id), lambda m: sum(x.startswith("train: step ") for x in m) >= 3)
    steps = [m for m in logs if m.startswith("train: step ")]
    assert [m.split(" (")[0] for m in steps] == ["train: step 1/3", "train: step 2/3", "train: step 3/3"]
    assert all(", reward accuracy " in m and ", margin " in m and m.endswith(" tokens/s") for m in steps), steps
    assert any(m.startswith("precompute train: 24/24 sequences (100%)") for m in logs), logs

    # links: the MLflow run (the local store: through `mlflow ui`), the registered version, the plots
    tracking.connect(mlflow_uri())
    experiment_id = MlflowClient().get_run(run_id).info.experiment_id
    (link,) = art["dpo-mlflow-run"]
    assert link.type == "markdown"  # a link artifact: [text](url)
    assert f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}" in link.data
    assert f"runs:/{run_id}" in link.description and "mlflow ui --backend-store-uri sqlite:///" in link.description
    (version,) = art["dpo-model-version"]
    assert "http://127.0.0.1:5000/#/models/tiny-ui/versions/1" in version.data
    assert "models:/tiny-ui/1" in version.data and "challenger" in version.description
    logged = {f.path for f in MlflowClient().list_artifacts(run_id, "evaluation")}
    for key, name in (("dpo-plot-training-curves", "training_curves.png"), ("dpo-plot-eval-scores", "eval_scores.png")):
        (image,) = art[key]
        assert image.type == "image"
        assert image.data == (f"http://127.0.0.1:5000/get-artifact?path=evaluation%2F{name}&run_uuid={run_id}")
        assert f"evaluation/{name}" in logged and str(Path(summary["run_dir"]) / "evaluate" / name) in image.description


def test_links_to_an_mlflow_server_never_hold_its_credentials():
    from tasks.artifacts import mlflow_ui, model_version_url, run_artifact_url, run_url

    uri = "https://alice:s3cret@mlflow.example.com:8443/"
    assert mlflow_ui(uri) == ("https://mlflow.example.com:8443", None)
    assert run_url(uri, "7", "abc") == "https://mlflow.example.com:8443/#/experiments/7/runs/abc"
    assert model_version_url(uri, "my model", 3) == "https://mlflow.example.com:8443/#/models/my%20model/versions/3"
    assert run_artifact_url(uri, "abc", "evaluation/x.png") == \
        "https://mlflow.example.com:8443/get-artifact?path=evaluation%2Fx.png&run_uuid=abc"
    base, command = mlflow_ui("sqlite:////tmp/a b/mlflow.db")
    assert base == "http://127.0.0.1:5000"
    assert command == "mlflow ui --backend-store-uri 'sqlite:////tmp/a b/mlflow.db' --host 127.0.0.1"


def test_stage_run_names_add_the_folder_of_a_variant():
    from data_contracts.config import load_config
    from tasks.run_names import stage_run_name

    cfg = load_config(None, {"reference.source": "model", "registry.model_name": "m"})
    assert stage_run_name("precompute", {"cfg": cfg, "run_dir": "/x/sw"}) == "precompute eval sw"  # no flow run here
    assert stage_run_name("train", {"cfg": cfg, "run_dir": "/x/sw-01"}) == "train sw-01"
    assert stage_run_name("register", {"cfg": cfg, "run_dir": "/x/sw-01"}) == "register m sw-01"
    assert stage_run_name("train", {}) == "train"  # whatever the parameters, a name


def test_the_sweep_flow_in_the_ui(dpo_home, monkeypatch):
    """The sweep is its own flow: deployed, its form (parameter schema) read back from the API holds
    the grid and the sweep settings and dpo/full's only a run's; a sweep's flow run is named after its
    folder and publishes the leaderboard (every stage faked: this is about what the UI shows)."""
    import flows.sweep as fs
    from flows.deployments import served_deployments

    with _client() as c:
        for dep in served_deployments(None):
            dep.apply()
        full = c.read_deployment_by_name("dpo/full").parameter_openapi_schema
        sweep = c.read_deployment_by_name("dpo-sweep/sweep")
    assert set(full["properties"]) == {"config", "overrides", "run_name"}
    props = sweep.parameter_openapi_schema["properties"]
    assert {"grid", "metric", "parallel", "stop_margin", "stop_metric", "stop_mode", "workers"} <= set(props)
    assert props["parallel"]["type"] == "integer" and sweep.parameters["grid"] == {"loss.beta": [0.05, 0.1, 0.2]}

    fake_sweep(monkeypatch, fail={2}, values={0: 0.4, 1: 0.7, 2: 0.1})
    state = fs.dpo_sweep(grid={"loss.beta": [0.1, 0.2, 0.3]}, run_name="lb", return_state=True)
    summary, flow_run_id = state.result(), state.state_details.flow_run_id
    with _client() as c:
        assert c.read_flow_run(flow_run_id).name == Path(summary["run_dir"]).name == "lb"
    (board,) = _artifacts(flow_run_id)["dpo-sweep-leaderboard"]
    assert board.type == "table" and "best by eval/win_rate is variant 01" in board.description
    assert "registered models:/m/1" in board.description
    rows = json.loads(board.data)
    assert [(r["best"], r["variant"], r["overrides"], r["eval/win_rate"], r["status"]) for r in rows] == [
        ("", "00", "loss.beta=0.1", 0.4, "completed"), ("*", "01", "loss.beta=0.2", 0.7, "completed"),
        ("", "02", "loss.beta=0.3", None, "failed")]


def test_stage_retries_back_off_exponentially_with_jitter(dpo_home, monkeypatch):
    """Every stage task retries twice, after about 2 s then about 4 s, each delay drawn at random
    (up to 1.5x): read from the failed attempts' AwaitingRetry states on the API."""
    from prefect import flow

    from data_contracts.config import load_config
    from dpo_engine.stages import register
    from tasks import stages as t

    for name in ("validate", "precompute", "train", "evaluate", "register"):
        task = getattr(t, name)
        assert (task.retries, task.retry_delay_seconds, task.retry_jitter_factor) == (2, [2.0, 4.0], 0.5), name

    calls = []

    def flaky(cfg, run_dir, validated, trained, evaluated):
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise RuntimeError("MLflow hiccup")
        return {"stage": "register", "summary": "register: fine", "metrics": {}}

    monkeypatch.setattr(register, "run", flaky)

    @flow
    def once():
        return t.register(load_config(), str(dpo_home / "r"), {}, {"fingerprint": "a"}, {"fingerprint": "b"},
                          return_state=True)

    task_state = once()
    assert task_state.is_completed() and len(calls) == 3
    task_run_id = task_state.state_details.task_run_id

    def read():
        with _client() as c:
            return [s for s in c.read_task_run_states(task_run_id) if s.name == "AwaitingRetry"]

    waits = _eventually(read, lambda s: len(s) == 2)
    delays = [(s.state_details.scheduled_time - s.timestamp).total_seconds() for s in waits]
    assert 2 * 0.62 <= delays[0] <= 3.0 + 0.01 and 4 * 0.62 <= delays[1] <= 6.0 + 0.01, delays
    assert delays[0] != pytest.approx(2.0, abs=1e-3) or delays[1] != pytest.approx(4.0, abs=1e-3)  # jittered
    assert calls[2] - calls[1] >= delays[1] - 0.5  # the second wait really was the longer one's


def test_a_failed_ui_write_pauses_the_artifacts_instead_of_blocking_each_step(monkeypatch):
    """An unreachable API costs one wait (the client's retries), not one per logging step: after a
    failed artifact write the next ones are skipped for PAUSE_S, then tried again."""
    from tasks import artifacts

    calls = []

    def down(*a, **k):
        calls.append(a)
        raise ConnectionError("All connection attempts failed")

    clock = [1000.0]
    monkeypatch.setattr(artifacts.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(artifacts, "_paused_until", 0.0)
    assert artifacts.ui_write("progress of train", down, 1) is None and len(calls) == 1
    assert artifacts.ui_write("progress of train", down, 2) is None and len(calls) == 1  # paused
    clock[0] += artifacts.PAUSE_S + 1
    assert artifacts.ui_write("progress of train", lambda x: x * 2, 21) == 42  # back after the pause
