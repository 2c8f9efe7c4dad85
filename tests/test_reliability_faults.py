"""Drill 8 (RELIABILITY.md): faults inside writes, not between them.

Each write is faulted at its exact call, after part of its bytes are on disk: the Parquet write of a
validated split (``ParquetSink.write``), a training checkpoint (``torch.save`` of ``trainer.pt``), the
model folder's weights (``safe_save_file``) and the removal of the folder it replaces, and the model
upload to MLflow (``log_model_artifacts``). The fault is a full disk (``OSError(ENOSPC)``, in this
process), SIGKILL (a small worker subprocess that calls the library function and kills itself from
inside the write), SIGTERM (a ``dpo run`` whose registration is inside the upload: Prefect turns it
into an exception) or a slow upload that times out and is retried. And the Prefect server is killed
and restarted (same port, same database) while a ``dpo run`` trains. Each: the previous output intact
(or none), no temporary file that a reader or later stage trusts, and the re-run completes and
resumes; registration leaves exactly one version whose artifacts hash like ``train/model`` and no
orphan MLflow LoggedModel.

Subprocess faults come from this module: ``DPO_TEST_FAULT=<target>:<how>`` and a ``sitecustomize``
on the subprocess's PYTHONPATH that calls :func:`install`, or ``python -c 'import
test_reliability_faults as f; f.worker()' MODE ...`` for the library-level workers. Imports here stay
light (stdlib and pytest): every faulted subprocess imports this module at start-up.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
FAULT_ENV = "DPO_TEST_FAULT"
TEMP_RE = re.compile(r"^\..+\.tmp(\d+)$")  # data_contracts.helpers.TEMP_RE
MODEL_NAME = "tiny-faults"
STEPS = 6
HOLD_DOWN_S = 8  # the Prefect server stays down this long after the train stage has finished


# --------------------------------------------------------------------------------- the faults

def fault(how: str) -> None:
    """Fail the write in progress: a full disk, or this process killed (SIGKILL) / asked to stop
    (SIGTERM: Prefect's handler raises in the main thread, at the sleep)."""
    if how == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if how in ("sigkill", "sigterm"):
        os.kill(os.getpid(), signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
        time.sleep(60)
        raise RuntimeError(f"{how} did not stop the process")
    if how == "slow":  # the upload stalls, then the store's client gives up: a transient failure
        time.sleep(2)
        raise TimeoutError("The read operation timed out")
    raise ValueError(how)


def _cut(path: Path, data: bytes) -> None:
    """Half of ``data`` at ``path``: what is on disk when a write dies in the middle."""
    Path(path).write_bytes(data[: len(data) // 2])


def install(spec: str, patch=setattr) -> dict:
    """Patch the writer named by ``spec`` (``<target>:<how>[:<arg>]``) to write part of its bytes and
    then ``fault(how)``. ``patch(obj, name, value)``: ``setattr`` in a subprocess, ``monkeypatch.setattr``
    here. Returns a dict counting the faulted calls (``hits``)."""
    target, how, *arg = spec.split(":")
    hits = {"hits": 0}

    if target == "parquet":  # the validated split's Parquet file, at its n-th row group (default 2)
        from data_contracts.validation import streaming

        orig = streaming.ParquetSink.write
        nth, seen = int(arg[0]) if arg else 2, {"n": 0}

        def write(self, table):
            orig(self, table)  # this row group is in the file
            if Path(self.path).name.startswith(".valid.parquet.tmp"):
                seen["n"] += 1
                if seen["n"] == nth:
                    hits["hits"] += 1
                    fault(how)  # row groups on disk, no footer

        patch(streaming.ParquetSink, "write", write)
    elif target == "checkpoint":  # trainer.pt of checkpoint step N (default 3)
        import torch

        orig_save = torch.save
        step = arg[0] if arg else "3"

        def save(obj, f, *a, **kw):
            if isinstance(f, (str, Path)) and Path(f).parent.name.startswith(f".step-{step}.tmp") and not hits["hits"]:
                hits["hits"] += 1
                buf = io.BytesIO()
                orig_save(obj, buf, *a, **kw)
                _cut(Path(f), buf.getvalue())
                fault(how)
            return orig_save(obj, f, *a, **kw)

        patch(torch, "save", save)
    elif target == "weights":  # model.safetensors of a model folder being written
        import safetensors.torch as st
        import transformers.modeling_utils as mu

        orig_file = mu.safe_save_file

        def save_file(tensors, filename, metadata=None):
            if not hits["hits"]:
                hits["hits"] += 1
                _cut(Path(filename), st.save(tensors, metadata=metadata))
                fault(how)
            return orig_file(tensors, filename, metadata=metadata)

        patch(mu, "safe_save_file", save_file)
    elif target == "replace":  # the old model folder's removal, once the new one is in place
        orig_rmtree = shutil.rmtree

        def rmtree(path, *a, **kw):
            p = Path(path)
            if TEMP_RE.match(p.name) and ".old" in p.name and (p / "config.json").is_file() and not hits["hits"]:
                hits["hits"] += 1
                (p / "model.safetensors").unlink()  # the first file gone, the rest still there
                fault(how)
            return orig_rmtree(path, *a, **kw)

        patch(shutil, "rmtree", rmtree)
    elif target == "upload":  # the model's artifacts going to the store, cut in model.safetensors
        from mlflow.tracking._tracking_service.client import TrackingServiceClient

        orig_upload = TrackingServiceClient.log_model_artifacts
        times = int(arg[0]) if arg else 1

        def upload(self, model_id, local_dir, artifact_path=None):
            if hits["hits"] >= times:
                return orig_upload(self, model_id, local_dir, artifact_path)
            hits["hits"] += 1
            dest = Path(self._get_artifact_repo(model_id, resource="logged_model").artifact_dir)
            for f in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
                out = dest / f.relative_to(local_dir)
                out.parent.mkdir(parents=True, exist_ok=True)
                if f.name == "model.safetensors":
                    _cut(out, f.read_bytes())
                    fault(how)
                shutil.copyfile(f, out)
            raise AssertionError("no model.safetensors uploaded")

        patch(TrackingServiceClient, "log_model_artifacts", upload)
    else:
        raise ValueError(spec)
    return hits


SITECUSTOMIZE = f"""\
import os, sys
if os.environ.get({FAULT_ENV!r}):
    sys.path.insert(0, {str(TESTS)!r})
    import test_reliability_faults
    test_reliability_faults.install(os.environ[{FAULT_ENV!r}])
"""


# --------------------------------------------------------------------------- shared helpers

def temps(folder: Path) -> list[Path]:
    """Temporary files and folders of atomic writes (``.<name>[.<thread>].tmp<pid>``) under ``folder``."""
    return sorted(p for p in Path(folder).rglob(".*") if TEMP_RE.match(p.name))


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (temporary ones left out), by relative path."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()
            and not any(TEMP_RE.match(part) for part in p.relative_to(folder).parts)}


def worker_env(home: Path, fault_spec: str | None = None, site: Path | None = None,
               api_url: str | None = None, tests: bool = True) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k not in (FAULT_ENV, "DPO_TEST_KILL_AT", "HF_HOME",
                                                                      "HF_DATASETS_CACHE", "MPLCONFIGDIR")}
    env.update({"DPO_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
                    [str(p) for p in (site, TESTS if tests else None, ROOT) if p is not None]),
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if fault_spec:
        env[FAULT_ENV] = fault_spec
    return env


def _tail(p) -> str:
    return (p.stdout or "")[-1500:] + "\n---\n" + (p.stderr or "")[-3000:]


def run_worker(home: Path, mode: str, *args, fault_spec: str | None = None, timeout: float = 240):
    """``worker(mode, *args)`` in a subprocess, ``fault_spec`` installed first."""
    cmd = [sys.executable, "-c", "import test_reliability_faults as f; f.worker()", mode, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env={**worker_env(home), **({FAULT_ENV: fault_spec} if fault_spec else {})},
                          capture_output=True, text=True, timeout=timeout, check=False)


def rows(n: int, tag: str = "a") -> list[dict]:
    return [{"prompt": f"Question {tag}{i}: what is {i} plus {i}?", "chosen": f" {2 * i}.",
             "rejected": f" {2 * i + 1}."} for i in range(n)]


def pairs(n: int = 8, seed: int = 0, vocab: int = 90):
    """Tokenized preference pairs for the trainer (ids of the tiny tokenizer)."""
    import pandas as pd
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        def ids(lo, hi, eos):
            k = int(torch.randint(lo, hi, (1,), generator=g))
            return torch.randint(5, vocab, (k,), generator=g).tolist() + ([2] if eos else [])
        out.append({"example_id": f"ex{i}", "prompt_input_ids": ids(3, 9, False),
                    "chosen_input_ids": ids(1, 6, True), "rejected_input_ids": ids(1, 6, True)})
    return pd.DataFrame(out)


def do_validate(out: Path, n: int, tag: str) -> dict:
    from tiny import tiny_tokenizer

    from data_contracts.config import DataConfig
    from data_contracts.validation import validate_split

    return validate_split(rows(n, tag), out, tiny_tokenizer(), DataConfig(max_length=128), batch_rows=8,
                          num_proc=1, name="mem")


def do_train(model_dir: Path, out: Path):
    """Train the tiny model 6 steps, a checkpoint every step; returns (result, weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from data_contracts.config import LossConfig, TrainConfig
    from dpo_engine.reference import compute_reference_logps
    from dpo_engine.training import train

    data = pairs()
    # one intra-op thread, as in the workers (OMP_NUM_THREADS=1): a resumed run is compared bit for
    # bit with an uninterrupted one, and the sum order of a reduction depends on the thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ref = compute_reference_logps(model, data, pad_id=0, batch_size=8)
        cfg = TrainConfig(learning_rate=1e-3, max_steps=STEPS, seed=3, save_steps=1, save_total_limit=3,
                          per_device_train_batch_size=2)
        res = train(model, data, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=out)
    finally:
        torch.set_num_threads(threads)
    return res, {k: v.clone() for k, v in model.state_dict().items()}


def do_export(model_dir: Path, dest: Path, shift: float) -> None:
    """Save the tiny model, its weights shifted by ``shift`` (a new version of it), as ``dest``."""
    import torch
    from tiny import tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from dpo_engine.modeling.loading import save_model_folder

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(shift)
    save_model_folder(model, tiny_tokenizer(), dest)


def worker() -> None:
    """Subprocess body: ``MODE ARGS`` with the fault of $DPO_TEST_FAULT installed."""
    sys.path.insert(0, str(ROOT))
    mode, args = sys.argv[1], sys.argv[2:]
    if os.environ.get(FAULT_ENV):
        install(os.environ[FAULT_ENV])
    if mode == "validate":
        do_validate(Path(args[0]), int(args[1]), args[2])
    elif mode == "train":
        do_train(Path(args[0]), Path(args[1]))
    elif mode == "export":
        do_export(Path(args[0]), Path(args[1]), float(args[2]))
    else:
        raise SystemExit(f"unknown mode {mode}")
    if os.environ.get(FAULT_ENV):
        raise SystemExit(f"the fault {os.environ[FAULT_ENV]} never fired")


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tiny import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("faults-model") / "tiny")


@pytest.fixture(scope="module")
def uninterrupted_training(tiny_model, tmp_path_factory):
    res, weights = do_train(tiny_model, tmp_path_factory.mktemp("faults-train-ref"))
    assert res.resumed_from == 0
    return weights


@pytest.fixture(scope="module")
def killed(tiny_model, tmp_path_factory):
    """The SIGKILL workers, side by side, each after a complete earlier output (where there is one):
    validate (killed in its 2nd row group), train (in step 3's trainer.pt), export (in the new
    weights) and export again (in removing the old folder once the new one is complete). Each job
    writes under its own folder; the state right after each kill is snapshotted here, before any
    test re-runs the write."""
    base = tmp_path_factory.mktemp("faults-killed")
    out = {"split": base / "split", "ckpt": base / "ckpt", "weights": base / "w" / "model",
           "replace": base / "r" / "model"}
    do_validate(out["split"], 24, "a")
    do_export(tiny_model, out["weights"], 0.0)
    do_export(tiny_model, out["replace"], 0.0)
    before = {k: tree_hashes(p) for k, p in out.items()}
    jobs = {"split": ("validate", out["split"], 40, "b", "parquet:sigkill"),
            "ckpt": ("train", tiny_model, out["ckpt"], "checkpoint:sigkill:3"),
            "weights": ("export", tiny_model, out["weights"], 0.01, "weights:sigkill"),
            "replace": ("export", tiny_model, out["replace"], 0.01, "replace:sigkill")}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:  # two cores
        procs = {k: pool.submit(run_worker, base / "home", *job[:-1], fault_spec=job[-1]) for k, job in jobs.items()}
        procs = {k: f.result() for k, f in procs.items()}
    print(f"SIGKILL workers: {time.perf_counter() - t0:.1f}s")
    for k, p in procs.items():
        assert p.returncode == -signal.SIGKILL, f"{k}: not killed\n" + _tail(p)
    # temporary files of the writes: in the split's and the checkpoints' folder, beside a model folder
    where = {"split": out["split"], "ckpt": out["ckpt"], "weights": base / "w", "replace": base / "r"}
    return {"out": out, "where": where, "before": before, "after": {k: tree_hashes(p) for k, p in out.items()},
            "temps": {k: temps(p) for k, p in where.items()}}


# ----------------------------------------------------------------------- 1. a Parquet write

def test_parquet_write_disk_full_keeps_the_previous_split(tmp_path, monkeypatch):
    from data_contracts.validation import read_valid

    out = tmp_path / "split"
    do_validate(out, 24, "a")
    before = tree_hashes(out)
    hits = install("parquet:enospc", monkeypatch.setattr)
    with pytest.raises(OSError) as e:
        do_validate(out, 40, "b")
    assert e.value.errno == errno.ENOSPC and hits["hits"] == 1
    assert tree_hashes(out) == before and temps(out) == []  # previous split intact, no temp file
    monkeypatch.undo()
    report = do_validate(out, 40, "b")  # the re-run completes
    assert report["valid"] == 40 and len(read_valid(out / "valid.parquet")) == 40
    assert temps(out) == []


def test_parquet_write_killed_keeps_the_previous_split(killed):
    from data_contracts.validation import read_valid

    out = killed["out"]["split"]
    assert killed["after"]["split"] == killed["before"]["split"]  # valid, rejects, report: the old ones
    left = killed["temps"]["split"]
    assert [p.name.split(".tmp")[0] for p in left] == [".rejects.parquet", ".valid.parquet"], left
    assert all(not p.name.endswith(".parquet") for p in left)  # no "*.parquet" glob picks them up
    assert len(read_valid(out / "valid.parquet")) == 24  # what the next stage reads: the old split
    assert do_validate(out, 40, "b")["valid"] == 40  # the re-run completes
    assert len(read_valid(out / "valid.parquet")) == 40


# -------------------------------------------------------------------- 2. a checkpoint write

def _ckpt_state(out: Path):
    from dpo_engine.training.checkpoints import latest_checkpoint

    found = latest_checkpoint(out / "checkpoints", log=lambda _: None)
    return (found.name if found else None), sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_write_disk_full_resumes_from_the_one_before(tiny_model, uninterrupted_training,
                                                                tmp_path, monkeypatch):
    out = tmp_path / "train"
    hits = install("checkpoint:enospc:3", monkeypatch.setattr)
    with pytest.raises(OSError) as e:
        do_train(tiny_model, out)
    assert e.value.errno == errno.ENOSPC and hits["hits"] == 1
    assert _ckpt_state(out) == ("step-2", ["step-1", "step-2"])
    assert temps(out) == []  # the half-written step-3 is gone
    monkeypatch.undo()
    res, weights = do_train(tiny_model, out)
    assert res.resumed_from == 2 and _same(weights, uninterrupted_training)


def test_checkpoint_write_killed_resumes_from_the_one_before(tiny_model, uninterrupted_training, killed, capsys):
    out = killed["out"]["ckpt"]
    assert [p.name.split(".tmp")[0] for p in killed["temps"]["ckpt"]] == [".step-3"]  # half a trainer.pt
    assert _ckpt_state(out) == ("step-2", ["step-1", "step-2"])
    res, weights = do_train(tiny_model, out)
    assert "removed an unfinished checkpoint write: .step-3.tmp" in capsys.readouterr().out
    assert res.resumed_from == 2 and _same(weights, uninterrupted_training)
    assert temps(out) == []  # the next writer removed the dead writer's folder


# ------------------------------------------------------------------ 3. a model folder replace

def test_model_folder_write_disk_full_keeps_the_previous_folder(tiny_model, tmp_path, monkeypatch):
    dest = tmp_path / "model"
    do_export(tiny_model, dest, 0.0)
    before = tree_hashes(dest)
    hits = install("weights:enospc", monkeypatch.setattr)
    with pytest.raises(OSError) as e:
        do_export(tiny_model, dest, 0.01)
    assert e.value.errno == errno.ENOSPC and hits["hits"] == 1
    assert tree_hashes(dest) == before and temps(tmp_path) == []
    monkeypatch.undo()
    do_export(tiny_model, dest, 0.01)
    after = tree_hashes(dest)
    assert after.keys() == before.keys() and after["model.safetensors"] != before["model.safetensors"]


def test_model_folder_write_killed_keeps_the_previous_folder(tiny_model, killed):
    dest, before = killed["out"]["weights"], killed["before"]["weights"]
    assert killed["after"]["weights"] == before
    assert [p.name.split(".tmp")[0] for p in killed["temps"]["weights"]] == [".model"]  # half the weights
    do_export(tiny_model, dest, 0.01)  # the re-run completes
    after = tree_hashes(dest)
    assert after.keys() == before.keys() and after["model.safetensors"] != before["model.safetensors"]


def test_model_folder_replace_killed_leaves_a_whole_folder(killed):
    """The old folder is renamed aside before the new one takes its name, and removed last: a kill
    while it is removed leaves the new folder whole at the name (and the half-removed old copy aside,
    a dead writer's temp that the next write removes)."""
    after, before = killed["after"]["replace"], killed["before"]["replace"]
    assert sorted(after) == sorted(before) and after["model.safetensors"] != before["model.safetensors"]
    assert [p.name.split(".tmp")[0] for p in killed["temps"]["replace"]] == [".model.old"]


def test_model_folder_replace_killed_rerun_completes(tiny_model, killed):
    dest, before = killed["out"]["replace"], killed["before"]["replace"]
    do_export(tiny_model, dest, 0.02)
    after = tree_hashes(dest)
    assert after.keys() == before.keys() and after["model.safetensors"] != before["model.safetensors"]


def test_the_next_writer_removes_dead_writers_temps(tiny_model, killed):
    for k in ("split", "weights", "replace"):
        assert killed["temps"][k], k  # the kill left them
    if temps(killed["where"]["split"]):  # the tests above re-ran the writes already
        do_validate(killed["out"]["split"], 40, "b")
    for k in ("weights", "replace"):
        if temps(killed["where"][k]):
            do_export(tiny_model, killed["out"][k], 0.03)
    assert temps(killed["where"]["split"]) == [] and temps(killed["where"]["weights"]) == []
    assert temps(killed["where"]["replace"]) == []


# ------------------------------------------------------------------------ 4. a model upload

RESAVED = {"tokenizer_config.json"}  # MLflow saves the tokenizer again: its config is rewritten


def artifact_mismatches(model_dir: Path, artifacts: Path) -> list[str]:
    """Files of the model folder whose logged copy (``model/`` or ``components/tokenizer/``) is
    missing or differs (sha256); the weights must be there."""
    bad = []
    for f in sorted(Path(model_dir).iterdir()):
        copies = [c for c in (artifacts / "model" / f.name, artifacts / "components" / "tokenizer" / f.name)
                  if c.is_file()]
        if not copies:
            bad.append(f"{f.name}: not logged")
        elif f.name not in RESAVED and hashlib.sha256(f.read_bytes()).hexdigest() not in \
                {hashlib.sha256(c.read_bytes()).hexdigest() for c in copies}:
            bad.append(f"{f.name}: differs")
    if not (artifacts / "model" / "model.safetensors").is_file():
        bad.append("model/model.safetensors: not logged")
    return bad


def logged_models(client, run_id: str) -> list:
    """The LoggedModels (not deleted) of the run's experiment."""
    return list(client.search_logged_models([client.get_run(run_id).info.experiment_id]))


def one_version(uri: str, model_name: str, model_dir: Path) -> dict:
    """Exactly one version of ``model_name``, its LoggedModel READY with artifacts hashing like
    ``model_dir``, and no other (orphan) LoggedModel in its run's experiment."""
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert len(versions) == 1, [(v.version, v.source) for v in versions]
    mv = versions[0]
    logged = logged_models(client, mv.run_id)
    assert [m.model_id for m in logged] == [mv.source.removeprefix("models:/")], \
        [(m.model_id, str(m.status)) for m in logged]  # no orphan LoggedModel
    assert logged[0].status == LoggedModelStatus.READY
    artifacts = Path(urlparse(logged[0].artifact_location).path)
    assert artifact_mismatches(model_dir, artifacts) == []
    return {"version": int(mv.version), "model_id": logged[0].model_id,
            "aliases": sorted(client.get_model_version(model_name, mv.version).aliases)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store (and state home) for the in-process upload drills."""
    from dpo_engine import tracking

    base = tmp_path_factory.mktemp("faults-store")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_HOME", str(base / "home"))
        uri = f"sqlite:///{base / 'mlflow.db'}"
        tracking.connect(uri)
        yield uri


def test_upload_disk_full_then_retry_leaves_one_version(store, tiny_model, monkeypatch):
    from dpo_engine import tracking

    rid = tracking.start_run("faults-enospc", "r1")
    hits = install("upload:enospc", monkeypatch.setattr)
    with pytest.raises(OSError) as e:
        tracking.register_model(rid, tiny_model, "tiny-enospc", metrics={}, gate_thresholds={})
    assert e.value.errno == errno.ENOSPC and hits["hits"] == 1
    monkeypatch.undo()
    info = tracking.register_model(rid, tiny_model, "tiny-enospc", metrics={}, gate_thresholds={})
    assert info["version"] == 1
    assert one_version(store, "tiny-enospc", tiny_model)["aliases"] == ["challenger", "champion"]


def test_slow_upload_timed_out_and_retried_leaves_one_version(store, tiny_model, monkeypatch):
    from dpo_engine import tracking
    from dpo_engine.tracking import client as tracking_client

    rid = tracking.start_run("faults-slow", "r1")
    monkeypatch.setattr(tracking_client, "_policy", tracking.RetryPolicy(timeout_s=60, backoff_s=0.2))
    hits = install("upload:slow", monkeypatch.setattr)  # 2 s into model.safetensors, then a time-out
    info = tracking.register_model(rid, tiny_model, "tiny-slow", metrics={}, gate_thresholds={})
    assert hits["hits"] == 1 and info["version"] == 1  # register_model's own retry logged it again
    one_version(store, "tiny-slow", tiny_model)


def test_killed_after_the_upload_before_the_version_leaves_no_orphan(store, tiny_model):
    """A registration stopped between a complete upload and its version (drill 1's ``model-logged``
    point) leaves a READY LoggedModel that no version points at: the next registration removes it."""
    from mlflow import MlflowClient

    from dpo_engine import tracking

    class Stop(BaseException):
        pass

    def stop(point):
        if point == "model-logged":
            raise Stop

    rid = tracking.start_run("faults-logged", "r1")
    with pytest.raises(Stop):
        tracking.register_model(rid, tiny_model, "tiny-logged", metrics={}, gate_thresholds={}, on_step=stop)
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    assert [str(m.status) for m in logged_models(client, rid)] == ["READY"]
    tracking.register_model(rid, tiny_model, "tiny-logged", metrics={}, gate_thresholds={})
    one_version(store, "tiny-logged", tiny_model)


# ------------------------------------------- 5. whole runs: SIGTERM in the upload, Prefect restarted

def dpo(home: Path, *args, api_url: str | None = None, fault_spec: str | None = None,
        site: Path | None = None, timeout: float = 400) -> subprocess.CompletedProcess:
    """A ``dpo`` command in its own session; ``fault_spec`` installed at start-up (``site``)."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], cwd=ROOT,
                          env=worker_env(home, fault_spec, site if fault_spec else None, api_url, tests=False),
                          capture_output=True, text=True, timeout=timeout, start_new_session=True, check=False)


def home_uri(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"


def stage_statuses(run: Path) -> dict[str, str]:
    return {k: v["status"] for k, v in json.loads((run / "summary.json").read_text())["stages"].items()}


def visible_temps(home: Path) -> list[Path]:
    """Temporary files of killed writers where a stage could read them: not dot-named, or inside the
    checkpoints, the reference cache or the stage index (MLflow's and Prefect's own stores left out)."""
    left = [p for p in home.rglob("*") if ".tmp" in p.name and p.suffix != ".lock"
            and not {"mlflow", "prefect"} & set(p.relative_to(home).parts[:1])]
    return [p for p in left if not p.name.startswith(".") or "checkpoints" in p.parts or "cache" in p.parts]


class RestartableServer:
    """``prefect server start`` on 127.0.0.1 with its own home and database, killed (SIGKILL, its
    process group) and started again on the same port and database."""

    def __init__(self, home: Path, env: dict):
        from servers import free_port

        self.home, self.port, self.proc = home, free_port(), None
        self.env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
        self.env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                         "PREFECT_UI_ENABLED": "false", "HOME": str(home)})
        self.url = f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float = 180) -> float:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                      "--port", str(self.port)], stdout=open(self.home / "server.log", "ab"),
                                     stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        while True:
            assert self.proc.poll() is None, (self.home / "server.log").read_text()[-2000:]
            assert time.perf_counter() - t0 < timeout, "Prefect server did not start"
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return time.perf_counter() - t0
            except OSError:
                time.sleep(0.25)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def flow_run_states(self) -> list[str]:
        req = urllib.request.Request(self.url + "/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            runs = json.loads(resp.read())
        return [r["state"]["type"] for r in sorted(runs, key=lambda r: r["created"])]


def _sigterm_chain(base: Path, config: Path, api_url: str, site: Path) -> dict:
    """SIGTERM inside the upload of a ``dpo run``, SIGKILL inside the upload of ``dpo register``,
    then ``dpo run`` again: one version, its artifacts those of train/model, no orphan LoggedModel."""
    from mlflow import MlflowClient

    home, run = base / "home", base / "home" / "runs" / "reg"
    out, t0 = {}, time.perf_counter()
    p = dpo(home, "run", "--config", config, "--run-name", "reg", api_url=api_url, fault_spec="upload:sigterm", site=site)
    out["sigterm"] = {"rc": p.returncode, "s": round(time.perf_counter() - t0, 1),
                      "last_line": (p.stderr.strip().splitlines() or [""])[-1][:300]}
    assert p.returncode not in (0, -signal.SIGKILL), _tail(p)
    assert (run / "train" / "model" / "model.safetensors").is_file(), _tail(p)
    assert not (run / "register.json").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stages"]["register"]["status"] == "not run", summary
    client = MlflowClient(tracking_uri=home_uri(home), registry_uri=home_uri(home))
    run_id = (run / "train" / "mlflow_run_id").read_text().strip()
    assert client.search_model_versions(f"run_id = '{run_id}'") == []
    out["after_sigterm"] = sorted(str(m.status) for m in logged_models(client, run_id))

    t1 = time.perf_counter()
    p = dpo(home, "register", "--run-dir", run, fault_spec="upload:sigkill", site=site)
    out["sigkill"] = {"rc": p.returncode, "s": round(time.perf_counter() - t1, 1)}
    assert p.returncode == -signal.SIGKILL, _tail(p)
    assert client.search_model_versions(f"run_id = '{run_id}'") == []
    out["after_sigkill"] = sorted(str(m.status) for m in logged_models(client, run_id))

    t2 = time.perf_counter()
    p = dpo(home, "run", "--config", config, "--run-name", "reg", api_url=api_url)
    out["rerun"] = {"rc": p.returncode, "s": round(time.perf_counter() - t2, 1)}
    assert p.returncode == 0, _tail(p)
    assert stage_statuses(run) == {"validate": "reused", "precompute": "reused", "train": "reused",
                                   "evaluate": "reused", "register": "completed"}
    out["registered"] = one_version(home_uri(home), MODEL_NAME, run / "train" / "model")
    assert out["registered"]["aliases"] == ["challenger", "champion"]
    assert visible_temps(home) == []
    out["total_s"] = round(time.perf_counter() - t0, 1)
    return out


def _restart_chain(base: Path, config: Path) -> dict:
    """A ``dpo run`` whose Prefect server is killed as training starts and started again (same port,
    same database): the flow completes, or fails in one line and the re-run resumes."""
    home, run = base / "home", base / "home" / "runs" / "restart"
    (base / "prefect").mkdir()
    server = RestartableServer(base / "prefect", worker_env(home, tests=False))
    out = {"first_start_s": round(server.start(), 1)}
    try:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--run-name",
                                 "restart"], cwd=ROOT, env=worker_env(home, api_url=server.url, tests=False),
                                stdout=open(base / "run.out", "w"), stderr=open(base / "run.err", "w"),
                                start_new_session=True)
        while not (run / "train" / "mlflow_run_id").is_file():  # the train stage has started
            assert proc.poll() is None, (base / "run.err").read_text()[-3000:]
            assert time.perf_counter() - t0 < 300, "training never started"
            time.sleep(0.1)
        out["killed_at_s"] = round(time.perf_counter() - t0, 1)
        server.kill()
        t_kill = time.perf_counter()
        # kept down until the train stage has finished: its end (task state, markdown artifact) and
        # the start of evaluate go to a server that is not there
        while not (run / "train.json").is_file() and proc.poll() is None and time.perf_counter() - t_kill < 120:
            time.sleep(0.1)
        assert (run / "train.json").is_file(), (base / "run.err").read_text()[-3000:]
        time.sleep(HOLD_DOWN_S)
        out["evaluate_done_while_down"] = (run / "evaluate.json").is_file()  # False: the flow waited
        out["restart_s"] = round(server.start(), 1)
        out["down_s"] = round(time.perf_counter() - t_kill, 1)
        try:
            rc = proc.wait(timeout=400)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        out["rc"], out["run_s"] = rc, round(time.perf_counter() - t0, 1)
        err = (base / "run.err").read_text()
        if rc != 0:  # then: one line saying why, and a re-run that resumes
            out["last_line"] = (err.strip().splitlines() or [""])[-1][:300]
            p = dpo(home, "run", "--config", config, "--run-name", "restart", api_url=server.url)
            assert p.returncode == 0, _tail(p)
            out["rerun_stages"] = stage_statuses(run)
        else:
            assert json.loads((run / "summary.json").read_text())["status"] == "completed"
        out["flow_runs"] = server.flow_run_states()
        assert out["flow_runs"][-1] == "COMPLETED", out
    finally:
        server.kill()
    out["registered"] = one_version(home_uri(home), MODEL_NAME, run / "train" / "model")
    assert visible_temps(home) == []
    return out


def test_sigterm_in_the_upload_and_a_prefect_restart_mid_run(tiny_model, tmp_path):
    """Two chains side by side (one per core): the SIGTERM/SIGKILL upload chain on a Prefect server
    of the module, the restart chain on its own server."""
    from servers import prefect_server
    from test_reliability_crash import write_config

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    config = write_config(tmp_path / "run.yaml", tiny_model, registry={"model_name": MODEL_NAME})
    (tmp_path / "r").mkdir()
    (tmp_path / "p").mkdir()
    (tmp_path / "prefect-r").mkdir()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        restart = pool.submit(_restart_chain, tmp_path / "p", config)
        with prefect_server(tmp_path / "prefect-r", worker_env(tmp_path / "r" / "home", tests=False)) as url:
            sigterm = _sigterm_chain(tmp_path / "r", config, url, site)
        restart = restart.result()
    print(json.dumps({"sigterm": sigterm, "restart": restart, "wall_s": round(time.perf_counter() - t0, 1)},
                     indent=1, default=str))
