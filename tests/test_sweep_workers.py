"""Sweep variants across Prefect task workers: `dpo sweep --workers` submits each variant as a
background task run; a separate `dpo sweep-worker` process (one per GPU or machine in production)
trains and evaluates them; the sweep still validates and precomputes once and registers only the best."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from servers import prefect_server
from tiny import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update({"DPO_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    return env


def test_variants_run_on_a_task_worker(tmp_path):
    home = tmp_path / "home"
    (tmp_path / "prefect").mkdir()
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir(tmp_path / "tiny"))},
        "data": {"train_limit": 12, "eval_limit": 6, "max_length": 256},
        "reference": {"batch_size": 8},
        "train": {"per_device_train_batch_size": 4, "max_steps": 2, "learning_rate": 1e-3},
        "eval": {"num_prompts": 2, "max_new_tokens": 4, "batch_size": 4},
        "registry": {"experiment": "workers", "model_name": "tiny-workers", "gate": {"thresholds": {}}}}))
    with prefect_server(tmp_path / "prefect", _env(home)) as url:
        env = {**_env(home), "PREFECT_API_URL": url}
        log = open(tmp_path / "worker.log", "wb")
        worker = subprocess.Popen([sys.executable, "-m", "flows.cli", "sweep-worker", "--limit", "2"],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                p = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", "--config", str(config),
                                    "--variant", "loss.beta=0.1", "--variant", "loss.beta=0.5,loss.loss_type=ipo",
                                    "--metric", "eval/rewards/margins", "--run-name", "wk", "--workers",
                                    "--parallel", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                                   timeout=400)
            except subprocess.TimeoutExpired as e:
                out = (e.stdout or b"")[-3000:], (e.stderr or b"")[-3000:]
                log = (tmp_path / "worker.log").read_text(errors="replace")[-4000:]
                pytest.fail(f"sweep did not finish in 400 s\n{out}\n--- worker (alive: "
                            f"{worker.poll() is None})\n{log}")
        finally:
            worker.terminate()
            worker.wait(timeout=60)
        _readme_failure_notification(url)
    worker_log = (tmp_path / "worker.log").read_text(errors="replace")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:] + "\n--- worker\n" + worker_log[-3000:]
    s = json.loads((home / "runs" / "wk" / "summary.json").read_text())
    assert s["workers"] is True and s["precomputes"] == 1 and s["registered_version"] == 1
    ran_on = {v["ran_on"].rsplit(":", 1)[1] for v in s["variants"]}
    assert ran_on == {str(worker.pid)}, (ran_on, worker.pid)  # both trained in the worker process
    assert [v["status"] for v in s["variants"]] == ["completed", "completed"]
    assert f"on {os.uname().nodename}:{worker.pid}" in p.stdout


def test_workers_need_a_shared_prefect_server(dpo_home, capsys, monkeypatch):
    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["sweep-worker"]) == 1
    assert "needs a Prefect server shared with the sweep: set PREFECT_API_URL" in capsys.readouterr().err
    assert main(["sweep", "--variant", "loss.beta=0.1", "--workers"]) == 1
    assert "dpo sweep --workers needs a Prefect server" in capsys.readouterr().err


def _readme_failure_notification(url: str) -> None:
    """README's recipe (a notification block, an automation on failed/crashed `dpo` runs) is
    accepted by a real Prefect server and reads back with its trigger and action."""
    import re

    import prefect.settings as ps

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# PREFECT_API_URL=.*?notify\.py\n.*?)```", readme, re.S).group(1)
    code = code.replace("https://hooks.slack.com/services/...", "https://hooks.slack.com/services/T0/B0/x")
    with ps.temporary_settings(updates={ps.PREFECT_API_URL: url}):
        exec(compile(code, "README.md", "exec"), {})
        from prefect.automations import Automation

        auto = Automation.read(name="dpo-failed")
    assert auto.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
    related = auto.trigger.match_related
    related = related.root if hasattr(related, "root") else related
    assert related == {"prefect.resource.role": "flow", "prefect.resource.name": "dpo"}
    assert type(auto.actions[0]).__name__ == "SendNotification"
