"""FSDP through `accelerate launch --config_file configs/accelerate/fsdp.yaml` (FSDP2 fully_shard on 2
gloo CPU ranks): the sharded training ends with the weights of one process with the global batch."""

from pathlib import Path

import pytest

from test_distributed import launched_matches_single

FSDP_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"


def test_fsdp_config_trains_like_one_process(dpo_home, tmp_path):
    launched_matches_single(dpo_home, tmp_path, **{"train.accelerate_config": str(FSDP_CONFIG)})


def test_fsdp_refuses_what_it_does_not_shard(monkeypatch):
    from data_contracts.config import TrainConfig
    from dpo_engine.trainer import TrainingError, _check_fsdp, fsdp_settings

    assert fsdp_settings() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")
    assert fsdp_settings() == {"version": "2", "layers": ["LlamaDecoderLayer"], "reshard": True, "offload": False}
    with pytest.raises(TrainingError, match="train.save_steps"):
        _check_fsdp(TrainConfig(save_steps=10), None, None)
