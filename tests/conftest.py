"""Shared fixtures: offline, project state in a temporary folder, tiny local models."""

import os
import sys
from pathlib import Path

import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Prefect's temporary API server gets 20 s to start by default; on 2 busy cores it can need more.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# `mlflow server` started by the drills: no job runner (7 huey worker processes for GenAI jobs)
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
# A session-wide state home: Prefect reads its settings once, at import, from here.
os.environ["DPO_HOME"] = tempfile.mkdtemp(prefix="dpo-test-home-")
for var in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI"):
    os.environ.pop(var, None)

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture
def dpo_home(tmp_path, monkeypatch):
    """An isolated state home (Prefect/MLflow/HF/caches) for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("DPO_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One state home and local MLflow store (SQLite) for a whole test module: creating a store takes
    seconds."""
    from dpo_engine import tracking

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        tracking.connect(f"sqlite:///{home}/mlflow/mlflow.db")
        yield home


import logging  # noqa: E402

# Prefect's temporary server logs "stopping" at interpreter exit, after pytest closed its streams.
logging.raiseExceptions = False


@pytest.fixture(autouse=True)
def _transformers_globals_restored():
    """transformers' from_pretrained swaps process-wide globals (PreTrainedModel.tie_weights, the
    torch.nn.init functions) while it runs; a load interrupted or raced in a test's thread could leave
    them swapped for the tests that follow in this process: put them back, and say so."""
    import torch.nn.init as init
    from transformers import PreTrainedModel

    tie = PreTrainedModel.__dict__.get("tie_weights")
    inits = {k: v for k, v in vars(init).items() if callable(v) and not k.startswith("_")}
    yield
    if PreTrainedModel.__dict__.get("tie_weights") is not tie:
        PreTrainedModel.tie_weights = tie
        print("conftest: PreTrainedModel.tie_weights was left swapped by this test; restored")
    for k, v in inits.items():
        if getattr(init, k) is not v:
            setattr(init, k, v)
