"""Shared fixtures: offline, project state in a temporary folder, tiny local models."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
