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
    from dpo_engine.training import TrainingError, fsdp_settings
    from dpo_engine.training.distributed import check_fsdp as _check_fsdp

    assert fsdp_settings() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")
    assert fsdp_settings() == {"version": "2", "layers": ["LlamaDecoderLayer"], "reshard": True, "offload": False}
    _check_fsdp(TrainConfig(save_steps=10), None, None)  # checkpoints: gathered, see below
    with pytest.raises(TrainingError, match="reference.sync_ref_model"):
        _check_fsdp(TrainConfig(), (0.6, 2), None)
    with pytest.raises(TrainingError, match="train.eval_steps"):
        _check_fsdp(TrainConfig(eval_steps=2), None, lambda step: {})


def test_fsdp_checkpoints_resume_exactly(tmp_path, monkeypatch):
    """FSDP in this process (a 1-rank gloo group): checkpoints gather the shards into the usual files,
    a run killed after the step-2 checkpoint resumes from it and ends with the uninterrupted weights,
    which equal the unsharded trainer's."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from data_contracts.config import LossConfig, TrainConfig
    from dpo_engine.reference import compute_reference_logps
    from dpo_engine.training import TrainingError, train
    from test_trainer import _pairs
    from tiny import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / "m")
    load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # noqa: E731
    pairs = _pairs(n=8)
    ref = compute_reference_logps(load(), pairs, pad_id=0, batch_size=8)
    cfg = TrainConfig(learning_rate=1e-3, max_steps=4, seed=1, per_device_train_batch_size=4, save_steps=2)
    plain = load()
    train(plain, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "plain")

    def crash(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for k, v in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                     "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"}.items():
            monkeypatch.setenv(k, v)
        whole = load()
        train(whole, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "whole")
        with pytest.raises(KeyboardInterrupt):
            train(load(), pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "killed",
                  progress=crash)
        assert (tmp_path / "killed" / "checkpoints" / "step-2" / "model.safetensors").is_file()
        resumed = load()
        res = train(resumed, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "killed")
        assert res.resumed_from == 2
        for a, b, c in zip(whole.parameters(), resumed.parameters(), plain.parameters()):
            assert type(a) is torch.nn.Parameter and torch.equal(a, b)  # plain again, as exported
            assert torch.allclose(a, c, atol=1e-6)
        with pytest.raises(TrainingError, match="written without FSDP"):  # plain checkpoints are not mixed in
            train(load(), pairs, ref, loss_cfg=LossConfig(), cfg=cfg.model_copy(update={"max_steps": 5}), pad_id=0,
                  out_dir=tmp_path / "plain")
    finally:
        dist.destroy_process_group()
