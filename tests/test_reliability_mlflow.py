"""Drill 2 (RELIABILITY.md): the MLflow tracking server goes away mid-run.

A real ``mlflow server`` (127.0.0.1, free port, SQLite backend and artifact folder in the test's
temporary folder) is started by the test and killed at training step 2. Training goes on (its
metrics wait in the run's outbox file), evaluation goes on, registration waits with back-off; the
server comes back and the run ends with every step metric in MLflow and exactly one model version.
If it never comes back, the run fails with one line and the trained model stays on disk, and
`dpo register --run-dir` registers it later.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tiny import tiny_model_dir

STEPS = 6
DOWN_AT_STEP = 2


class MlflowServer:
    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 240) -> None:  # a loaded 2-core CI machine: a minute or more
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["HOME"] = str(self.root)  # nothing of the server's lands in the real $HOME
        log = open(self.root / f"server-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.starts += 1
        t0 = time.time()
        while time.time() - t0 < timeout:
            assert self.proc.poll() is None, (self.root / f"server-{self.starts - 1}.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def server(tmp_path):
    s = MlflowServer(tmp_path / "mlflow-server")
    s.start()
    yield s
    s.stop()


@pytest.fixture
def tiny(tmp_path):
    return tiny_model_dir(tmp_path / "tiny-model")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    # what registry.connect sets for an HTTP store, undone after the test
    for k, v in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
        monkeypatch.setenv(k, v)
    import prefect.settings as ps

    # a loaded 2-core machine can take longer than Prefect's 20 s to start its temporary server
    with ps.temporary_settings(updates={ps.PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        yield


def _overrides(model_dir, uri, retry_s):
    return {"model.name_or_path": str(model_dir), "data.train_limit": 12, "data.eval_limit": 6,
            "data.max_length": 256, "train.per_device_train_batch_size": 2, "train.max_steps": STEPS,
            "train.learning_rate": 1e-3, "train.save_steps": 2, "train.logging_steps": 1, "eval.num_prompts": 3,
            "eval.max_new_tokens": 4, "eval.batch_size": 4, "reference.batch_size": 8,
            "registry.model_name": "tiny-outage", "registry.gate.thresholds": {},
            "tracking.mlflow_tracking_uri": uri, "registry.retry_timeout_s": retry_s,
            "registry.retry_backoff_s": 0.5, "registry.retry_max_backoff_s": 2.0}


def _down_during_training(monkeypatch, server):
    """Kill the server just before step DOWN_AT_STEP's metrics are logged; record the steps."""
    from dpo_engine.stages import train as train_stage

    real, seen = train_stage.train, []

    def wrapped(*args, log_fn, **kwargs):
        def log(metrics, step):
            if step == DOWN_AT_STEP:
                server.stop()
            seen.append(step)
            log_fn(metrics, step)
        return real(*args, log_fn=log, **kwargs)

    monkeypatch.setattr(train_stage, "train", wrapped)
    return seen


def _check_store(uri: str, run_id: str) -> None:
    """All step metrics and the evaluation in MLflow, exactly one model version, nothing pending."""
    from mlflow import MlflowClient

    from dpo_engine import tracking as registry

    registry.connect(uri)
    client = MlflowClient()
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert steps == list(range(1, STEPS + 1)), steps
    metrics = client.get_run(run_id).data.metrics
    assert "eval/rewards/accuracies" in metrics and "data/train_pairs" in metrics
    arts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert "evaluation/metrics.json" in arts and "evaluation/samples.jsonl" in arts
    versions = client.search_model_versions("name = 'tiny-outage'")
    assert [int(v.version) for v in versions] == [1] and versions[0].run_id == run_id
    assert sorted(client.get_model_version("tiny-outage", "1").aliases) == ["challenger", "champion"]
    assert registry.Outbox(run_id).pending() == []


def test_server_down_in_training_and_registration_then_back(dpo_home, tiny, server, monkeypatch):
    from dpo_engine import tracking as registry
    from dpo_engine.stages import register as register_stage
    from flows.dpo import dpo

    seen = _down_during_training(monkeypatch, server)
    real_register, at_register = register_stage.run, {}

    def register(cfg, run_dir, validated, trained, evaluated):
        at_register["pending"] = registry.Outbox(trained["mlflow_run_id"]).pending()
        assert server.proc.poll() is not None  # still down when registration starts
        threading.Timer(1.0, server.start).start()  # back while registration is retrying
        return real_register(cfg, run_dir, validated, trained, evaluated)

    monkeypatch.setattr(register_stage, "run", register)
    t0 = time.time()
    summary = dpo(overrides=_overrides(tiny, server.uri, retry_s=120), run_name="outage")
    assert summary["status"] == "completed", summary
    assert seen == list(range(1, STEPS + 1))  # training went on while the server was down
    # buffered, not lost: the steps from the outage on, and evaluation's metrics and files
    pending = at_register["pending"]
    buffered_steps = sorted(e["step"] for e in pending if "metrics" in e and "loss" in e["metrics"])
    # (sent by a background thread, a step just before the outage may still be waiting too)
    assert buffered_steps == list(range(buffered_steps[0], STEPS + 1)) and buffered_steps[0] <= DOWN_AT_STEP
    assert any("artifact" in e for e in pending) and any("table" in e for e in pending)
    assert server.starts == 2 and summary["registered_version"] == 1
    _check_store(server.uri, summary["mlflow_run_id"])
    print(f"outage drill: {time.time() - t0:.1f}s")


def test_server_never_back_fails_in_one_line_then_dpo_register(dpo_home, tiny, server, monkeypatch,
                                                               capsys):
    from data_contracts.errors import user_error
    from flows.cli import main
    from flows.dpo import dpo

    _down_during_training(monkeypatch, server)
    with pytest.raises(Exception) as info:
        dpo(overrides=_overrides(tiny, server.uri, retry_s=3), run_name="never-back")
    err = user_error(info.value)
    assert type(err).__name__ == "TrackingUnavailable", info.value
    message = str(err)
    run_dir = dpo_home / "runs" / "never-back"
    assert "\n" not in message and "unavailable" in message
    assert f"dpo register --run-dir {run_dir}" in message
    model_dir = run_dir / "train" / "model"
    assert str(model_dir) in message and (model_dir / "model.safetensors").is_file()

    # the CLI says the same in one line (exit 1)
    capsys.readouterr()
    assert main(["register", "--run-dir", str(run_dir)]) == 1
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.strip() and not line.startswith("MLflow unavailable")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "dpo register" in lines[0], lines

    server.start()
    assert main(["register", "--run-dir", str(run_dir)]) == 0  # config: the run folder's config.yaml
    assert main(["register", "--run-dir", str(run_dir)]) == 0  # again: still one version
    from dpo_engine.stages.index import load_result
    _check_store(server.uri, load_result(run_dir, "train")["mlflow_run_id"])


def test_outbox_keeps_entries_while_the_store_fails_and_sends_them_once(dpo_home, tmp_path, monkeypatch):
    """The outbox on its own (SQLite store, failures injected): nothing lost, nothing doubled, a line
    cut short by a crash and a vanished file are reported, not silently dropped."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dpo_engine import tracking as registry
    from dpo_engine.tracking import client as tracking_client

    registry.connect(f"sqlite:///{dpo_home / 'mlflow' / 'mlflow.db'}",
                     retry=registry.RetryPolicy(timeout_s=5, backoff_s=0.05, max_backoff_s=0.1))
    run_id = registry.start_run("outbox", "r")
    said = []
    box = registry.Outbox(run_id, log=said.append)
    real = tracking_client.mlflow_client

    class Down:
        def __getattr__(self, name):
            def fail(*a, **k):
                raise MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-batch "
                                      "failed with exception Connection refused")
            return fail

    monkeypatch.setattr(tracking_client, "mlflow_client", lambda: Down())
    for step in range(1, 6):
        assert box.log_metrics({"loss": 1.0 / step}, step=step) is False
    art = tmp_path / "a.json"
    art.write_text("{}")
    box.log_artifact(art, "evaluation")
    box.log_artifact(tmp_path / "gone.json", "evaluation")
    with open(box.path, "ab") as fh:  # a crash in the middle of an append
        fh.write(b'{"metrics": {"loss": 0.')
    box.log_metrics({"loss": 0.1}, step=6)
    assert len(box.pending()) == 8 and any("cut short" in s for s in said)
    assert any("MLflow unavailable" in s for s in said)
    with pytest.raises(registry.TrackingUnavailable, match="unavailable: send buffered"):
        box.send(wait=True, policy=registry.RetryPolicy(timeout_s=0.2, backoff_s=0.05))

    monkeypatch.setattr(tracking_client, "mlflow_client", real)
    assert box.send(wait=True) and box.pending() == [] and not box.path.exists()
    assert box.send(wait=True)  # nothing left: a second send adds nothing
    client = MlflowClient()
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5, 6]
    assert [a.path for a in client.list_artifacts(run_id, "evaluation")] == ["evaluation/a.json"]
    assert any("gone.json no longer exists" in s for s in said)


def test_background_outbox_never_waits_for_a_hanging_server(dpo_home, monkeypatch):
    """A tracking server that accepts connections and never answers: training's outbox (background
    mode) returns at once on every step while a send hangs; the entries wait on disk and are sent
    once, in order, when a store answers."""
    import socket
    import threading
    import time

    import mlflow
    from mlflow import MlflowClient

    from dpo_engine import tracking as registry

    store = f"sqlite:///{dpo_home / 'mlflow' / 'mlflow.db'}"
    registry.connect(store, retry=registry.RetryPolicy(timeout_s=30, backoff_s=0.05, max_backoff_s=0.1))
    run_id = registry.start_run("hang", "r")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held, stop = [], threading.Event()

    def accept():  # take connections, answer nothing
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        mlflow.set_tracking_uri(f"http://127.0.0.1:{listener.getsockname()[1]}")
        said = []
        box = registry.Outbox(run_id, log=said.append, background=True)
        slowest = 0.0
        for step in range(1, 6):
            t0 = time.monotonic()
            box.log_metrics({"loss": 1.0 / step}, step=step)
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.05)
        assert slowest < 0.5, slowest  # a step never waits for the server
        assert held  # a send did reach the server and hangs there
        assert box.drain(timeout_s=0.2) is False and len(box.pending()) == 5
        box._sender.join(30)  # the hung request times out (3 s); the entries stay
        assert not box._sender.is_alive() and len(box.pending()) == 5
        assert any("MLflow unavailable" in s for s in said), said
    finally:
        stop.set()
        for c in held:
            c.close()
        listener.close()
    mlflow.set_tracking_uri(store)  # a store that answers
    assert box.send(wait=True) and box.pending() == []
    steps = sorted(m.step for m in MlflowClient().get_metric_history(run_id, "loss"))
    assert steps == [1, 2, 3, 4, 5]


def test_an_entry_the_store_refuses_for_good_is_set_aside_not_blocking(dpo_home, tmp_path, monkeypatch):
    """A permanently failing entry (HTTP 413 for an artifact) is reported in one line and set aside;
    the entries around it are sent and a wait=True send (what registration does) returns."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dpo_engine import tracking as registry
    from dpo_engine.tracking import client as tracking_client

    registry.connect(f"sqlite:///{dpo_home / 'mlflow' / 'mlflow.db'}",
                     retry=registry.RetryPolicy(timeout_s=2, backoff_s=0.05, max_backoff_s=0.1))
    run_id = registry.start_run("outbox-413", "r")
    said = []
    box = registry.Outbox(run_id, log=said.append)
    big, small = tmp_path / "big.bin", tmp_path / "small.json"
    big.write_bytes(b"x" * 1000)
    small.write_text("{}")
    real = tracking_client.mlflow_client()

    class Refusing:
        def __getattr__(self, name):
            return getattr(real, name)

        def log_artifact(self, run, path, artifact_path=None):
            if Path(path).name == "big.bin":
                raise MlflowException("API request to endpoint /api/2.0/mlflow-artifacts/artifacts failed with "
                                      "error code 413 != 200. Response body: 'Request Entity Too Large'")
            return real.log_artifact(run, path, artifact_path)

    monkeypatch.setattr(tracking_client, "mlflow_client", lambda: Refusing())
    box.log_metrics({"loss": 1.0}, step=1)
    box.log_artifact(big, "evaluation")
    box.log_artifact(small, "evaluation")
    box.log_metrics({"loss": 0.5}, step=2)
    assert box.send(wait=True) and box.pending() == []
    assert box.send(wait=True)  # nothing pending: the refused entry is not retried
    lines = [s for s in said if "refused" in s]
    assert len(lines) == 1 and "big.bin" in lines[0] and "413" in lines[0] and "\n" not in lines[0]
    assert [a["entry"]["artifact"] for a in box.set_aside()] == [str(big.resolve())]
    client = MlflowClient()
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2]
    assert [a.path for a in client.list_artifacts(run_id, "evaluation")] == ["evaluation/small.json"]
