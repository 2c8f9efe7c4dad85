"""Drill 1 (RELIABILITY.md): SIGKILL inside every stage, then re-run the flow.

Each `dpo run` is a subprocess in its own session; ``DPO_TEST_KILL_AT=<stage>:<point>`` makes
``dpo_engine.stages.runtime.crash_point`` SIGKILL its whole process group (a preempted machine) at
that named point. The runs report to one Prefect server started for the module (127.0.0.1), which
saves each run the start of a temporary one. One run (same ``--run-name``, same state home) is
killed at every point of its stages in pipeline order, each re-run going further (two such chains
side by side, see CHAINS); a last run without a kill must complete, reuse what finished, resume training from its checkpoint, and
register the model an uninterrupted run registers (same weights, same version tags), exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from servers import prefect_server
from tiny import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
KILL_ENV = "DPO_TEST_KILL_AT"
STEPS = 6
MODEL_NAME = "tiny-crash"
CONFIG = {
    "data": {"train_limit": 12, "eval_limit": 6, "max_length": 256},
    "reference": {"batch_size": 8},
    "train": {"per_device_train_batch_size": 2, "max_steps": STEPS, "learning_rate": 1e-3,
              "save_steps": 1, "logging_steps": 1, "seed": 1},
    "eval": {"num_prompts": 3, "max_new_tokens": 4, "batch_size": 4},
    "registry": {"model_name": MODEL_NAME, "gate": {"thresholds": {}}},
}
# per stage, the points killed in order (see crash_point calls in dpo_engine/stages/*.py and
# registry.register_model's on_step)
# (every crash point in the code: a test below checks that none is left out)
POINTS = {
    "validate": ["train-written", "before-record"],
    "precompute": ["train-computed", "train-cached", "before-record"],
    "train": ["mlflow-run", "step-2", "step-4", "exported"],
    "evaluate": ["computed", "written", "logged"],
    "register": ["outbox-sent", "model-logged", "version-created", "aliases-set", "before-record"],
}
# which stage outputs must be left untouched by the final run (they finished before the last kill)
DONE_BEFORE = {"validate": [], "precompute": ["validate"], "train": ["validate", "precompute"],
               "evaluate": ["validate", "precompute", "train"],
               "register": ["validate", "precompute", "train", "evaluate"]}


def _env(home: Path, kill_at: str | None = None, api_url: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k not in (KILL_ENV, "HF_HOME",
                                                                      "HF_DATASETS_CACHE", "MPLCONFIGDIR")}
    env.update({"DPO_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"})
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if kill_at:
        env[KILL_ENV] = kill_at
    return env


def run_flow(home: Path, config: Path, kill_at: str | None = None, run_name: str = "crash",
             api_url: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``dpo run`` in a new session (a kill takes its whole process group)."""
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(config),
                           "--run-name", run_name], cwd=ROOT, env=_env(home, kill_at, api_url),
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)


def write_config(path: Path, model_dir: Path, **sections) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["model"] = {"name_or_path": str(model_dir)}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def registered(home: Path, model_name: str = MODEL_NAME) -> dict:
    """Versions of ``model_name`` in the home's MLflow store: weights hash, tags, aliases, and the
    loss history (steps) of each version's run."""
    from mlflow import MlflowClient

    from dpo_engine import tracking as registry

    registry.connect(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    client = MlflowClient()
    out = []
    for mv in sorted(client.search_model_versions(f"name = '{model_name}'"), key=lambda v: int(v.version)):
        folder = registry.download_hf_folder(f"models:/{model_name}/{mv.version}",
                                             home.parent / f"dl-{home.name}-{mv.version}")
        out.append({"version": int(mv.version), "weights": weights_hash(folder),
                    "tags": {k: v for k, v in mv.tags.items() if k not in ("run_id", "run_dir")},
                    "aliases": sorted(client.get_model_version(model_name, mv.version).aliases),
                    "loss_steps": sorted(m.step for m in client.get_metric_history(mv.run_id, "loss"))})
    return {"versions": out}


def weights_hash(folder: Path) -> str:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        tensors = load_file(f)
        for name in sorted(tensors):
            h.update(name.encode())
            h.update(tensors[name].float().numpy().tobytes())
    return h.hexdigest()


def _tail(p: subprocess.CompletedProcess) -> str:
    return (p.stdout[-1500:] + "\n---\n" + p.stderr[-3000:])


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A Prefect server on 127.0.0.1 (its own home and database) for the module's runs."""
    with prefect_server(tmp_path_factory.mktemp("crash-prefect"), _env(Path("."))) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("crash-model") / "tiny")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, prefect_api, tmp_path_factory):
    base = tmp_path_factory.mktemp("crash-ref")
    config = write_config(base / "run.yaml", tiny_model)
    p = run_flow(base / "home", config, api_url=prefect_api)
    assert p.returncode == 0, _tail(p)
    reg = registered(base / "home")
    assert len(reg["versions"]) == 1
    return reg


def _mtimes(home: Path, stages: list[str]) -> dict[str, int]:
    run = home / "runs" / "crash"
    files = {"validate": [run / "validate" / "train" / "valid.parquet", run / "validate" / "eval" / "valid.parquet"],
             "precompute": sorted((home / "cache" / "reference").glob("*/*.parquet")),
             "train": [run / "train" / "model" / "model.safetensors"],
             "evaluate": [run / "evaluate" / "metrics.json", run / "evaluate" / "samples.jsonl"]}
    return {str(f): f.stat().st_mtime_ns for s in stages for f in files[s]}


# The kill points in two chains run side by side (each in its own state home; one chain per CPU):
# the first kills validate, precompute and train, the second (whose first run completes the first
# three stages) evaluate and register. Each chain ends with a clean re-run.
CHAINS = (("validate", "precompute", "train"), ("evaluate", "register"))


def _kill_chain(stages: tuple[str, ...], home: Path, config: Path, api_url: str, uninterrupted: dict) -> None:
    """One run (``--run-name crash``) killed at every point of ``stages`` in pipeline order, each
    re-run going further; after the first kill inside a stage the stages before it have finished,
    and the later kills and the final run must reuse them (same files), never redo them."""
    run = home / "runs" / "crash"
    for stage in stages:
        before = None
        for point in POINTS[stage]:
            p = run_flow(home, config, kill_at=f"{stage}:{point}", api_url=api_url)
            assert p.returncode == -signal.SIGKILL, f"{stage}:{point} did not kill the run\n" + _tail(p)
            if before is None:  # the earlier stages finished in this run
                before = _mtimes(home, DONE_BEFORE[stage])
                assert before or stage == "validate"
        # finished stages were reused by the later kill runs, not redone: the very same files
        assert _mtimes(home, DONE_BEFORE[stage]) == before, stage

    p = run_flow(home, config, api_url=api_url)
    assert p.returncode == 0, _tail(p)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert _mtimes(home, DONE_BEFORE[stages[-1]]) == before
    if stages[-1] == "train":  # killed after export: its final checkpoint is taken, no step is redone
        assert json.loads((run / "train.json").read_text())["resumed_from"] == STEPS
    # no half-written output or temporary file left behind by the kills is visible as an output:
    # in the run folder, its checkpoints, the reference cache and the stage index
    leftovers = [p for p in home.rglob("*") if ".tmp" in p.name and p.suffix != ".lock"
                 and not {"mlflow", "prefect"} & set(p.relative_to(home).parts[:1])]
    assert all(p.name.startswith(".") for p in leftovers), leftovers
    assert not [p for p in leftovers if "checkpoints" in p.parts or "cache" in p.parts], leftovers

    reg = registered(home)
    assert len(reg["versions"]) == 1, reg  # exactly once
    got, want = reg["versions"][0], uninterrupted["versions"][0]
    assert got["weights"] == want["weights"]
    assert got["tags"] == want["tags"]
    assert got["aliases"] == want["aliases"] == ["challenger", "champion"]
    assert set(got["loss_steps"]) == set(range(1, STEPS + 1))  # no step metric lost


def test_sigkill_in_every_stage_then_rerun_registers_the_uninterrupted_model(tiny_model, uninterrupted,
                                                                           prefect_api, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    config = write_config(tmp_path / "run.yaml", tiny_model)
    assert sorted(s for chain in CHAINS for s in chain) == sorted(POINTS)  # every stage is killed
    with ThreadPoolExecutor(len(CHAINS)) as pool:
        chains = [pool.submit(_kill_chain, stages, tmp_path / f"home{i}", config, prefect_api, uninterrupted)
                  for i, stages in enumerate(CHAINS)]
        for c in chains:
            c.result()  # re-raises a chain's failed assertion


def test_rerun_under_another_run_name_continues_the_training(tiny_model, uninterrupted, prefect_api,
                                                             tmp_path):
    """A scheduler re-runs with a fresh (time-stamped) run name: the unfinished training of the
    killed run is taken over from its checkpoints, not started again."""
    home = tmp_path / "home"
    config = write_config(tmp_path / "run.yaml", tiny_model)
    p = run_flow(home, config, kill_at="train:step-4", run_name="first", api_url=prefect_api)
    assert p.returncode == -signal.SIGKILL, _tail(p)
    p = run_flow(home, config, run_name="second", api_url=prefect_api)
    assert p.returncode == 0, _tail(p)
    trained = json.loads((home / "runs" / "second" / "train.json").read_text())
    assert trained["resumed_from"] == 3  # step 4 was being logged: the last checkpoint is step 3
    reg = registered(home)
    assert len(reg["versions"]) == 1
    assert reg["versions"][0]["weights"] == uninterrupted["versions"][0]["weights"]
    assert set(reg["versions"][0]["loss_steps"]) == set(range(1, STEPS + 1))


def test_every_crash_point_in_the_code_is_drilled():
    """The named points of every ``crash_point(STAGE, ...)`` / ``on_step(...)`` call in the stages
    and the registry (the precompute points per split: the train split's are drilled)."""
    import re

    found = set()
    for f in sorted((ROOT / "dpo_engine" / "stages").glob("*.py")):
        for point in re.findall(r'crash_point\(STAGE, f?"([^"]+)"\)', f.read_text()):
            found.add((f.stem, point.replace("{split}", "train").replace("{step}", "N")))
    tracking = "".join(f.read_text() for f in sorted((ROOT / "dpo_engine" / "tracking").glob("*.py")))
    found |= {("register", p) for p in re.findall(r'on_step\("([^"]+)"\)', tracking)}
    drilled = {(stage, re.sub(r"step-\d+", "step-N", p)) for stage, ps in POINTS.items() for p in ps}
    assert found and found <= drilled, sorted(found - drilled)
