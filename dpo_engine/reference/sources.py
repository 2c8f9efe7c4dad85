"""What training compares the policy with (``reference.source``)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from dpo_engine.modeling import load_reference_model
from dpo_engine.reference.cache import read_cache


def _precomputed(cfg, validated: dict, precomputed: dict, pairs: pd.DataFrame, device):
    """The cached log-probs of ``pairs`` (the precompute stage's)."""
    return read_cache(Path(precomputed["train_ref"]), expect_ids=pairs["example_id"].tolist(),
                      expect_key=precomputed["train_ref_key"])


def _adapter_disabled(cfg, validated: dict, precomputed: dict, pairs: pd.DataFrame, device):
    """None: the trainer runs the policy with its PEFT adapter off."""
    return None


def _model(cfg, validated: dict, precomputed: dict, pairs: pd.DataFrame, device):
    """A frozen reference model run online: ``reference.model_path``, else the policy's initial weights."""
    return load_reference_model(cfg.model, cfg.reference.model_path, validated["model_path"], device)


SOURCES = {"precomputed": _precomputed, "adapter_disabled": _adapter_disabled, "model": _model}


def training_reference(cfg, validated: dict, precomputed: dict, pairs: pd.DataFrame,
                       device: torch.device | str = "cpu"):
    """What the train stage compares the policy with (``reference.source``, one of :data:`SOURCES`):
    a DataFrame of cached log-probs, None, or a reference model."""
    return SOURCES[cfg.reference.source](cfg, validated, precomputed, pairs, device)
