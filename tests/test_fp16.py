"""train.precision=fp16: float16 autocast with dynamic loss scaling (GPUs without bf16), on the CPU
here: trains like fp32, skips a step whose gradients overflow, resumes with its loss scale."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from data_contracts.config import LossConfig, TrainConfig
from dpo_engine.training import optim as trainer_mod
from dpo_engine.reference import compute_reference_logps
from dpo_engine.training import train
from test_trainer import _pairs, _weights
from tiny import tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m")


def _load(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def _cfg(**kw):
    return TrainConfig(**{"learning_rate": 1e-3, "max_steps": 3, "seed": 1, "per_device_train_batch_size": 4,
                          "lr_scheduler_type": "constant", **kw})


@pytest.fixture
def high_initial_scale(monkeypatch):
    """A loss scale of 2^24: the first fp16 backward passes overflow (float16 max is 65,504)."""
    real = trainer_mod.make_scaler
    monkeypatch.setattr(trainer_mod, "make_scaler",
                        lambda device, enabled: torch.amp.GradScaler(device.type, init_scale=2.0 ** 24,
                                                                     enabled=enabled) if enabled else real(device, enabled))


def test_fp16_trains_like_fp32(tiny_dir, tmp_path):
    pairs = _pairs()
    ref16 = compute_reference_logps(_load(tiny_dir), pairs, pad_id=0, batch_size=4, precision="fp16")
    ref32 = compute_reference_logps(_load(tiny_dir), pairs, pad_id=0, batch_size=4)
    assert (ref16["ref_chosen_logps"] - ref32["ref_chosen_logps"]).abs().max() > 0  # fp16 did compute
    init = _weights(_load(tiny_dir))
    m16, m32 = _load(tiny_dir), _load(tiny_dir)
    h16 = train(m16, pairs, ref16, loss_cfg=LossConfig(), cfg=_cfg(precision="fp16"), pad_id=0,
                out_dir=tmp_path / "16").history
    train(m32, pairs, ref32, loss_cfg=LossConfig(), cfg=_cfg(), pad_id=0, out_dir=tmp_path / "32")
    assert abs(h16[0]["loss"] - math.log(2)) < 1e-3  # reference = policy under the same autocast
    assert [h["loss_scale"] for h in h16] == [2.0 ** 16] * 3 and not any(h["overflow_skipped"] for h in h16)
    u16, u32 = _weights(m16) - init, _weights(m32) - init
    assert torch.nn.functional.cosine_similarity(u16, u32, dim=0) > 0.99


def test_an_overflowing_step_is_skipped_and_the_scale_halved(tiny_dir, tmp_path, high_initial_scale):
    pairs = _pairs()
    ref = compute_reference_logps(_load(tiny_dir), pairs, pad_id=0, batch_size=4, precision="fp16")
    init = _weights(_load(tiny_dir))
    model = _load(tiny_dir)
    hist = train(model, pairs, ref, loss_cfg=LossConfig(), cfg=_cfg(precision="fp16", max_steps=1), pad_id=0,
                 out_dir=tmp_path / "one").history
    assert hist[0]["overflow_skipped"] == 1.0 and torch.equal(_weights(model), init)  # nothing applied

    model = _load(tiny_dir)
    hist = train(model, pairs, ref, loss_cfg=LossConfig(), cfg=_cfg(precision="fp16", max_steps=16), pad_id=0,
                 out_dir=tmp_path / "many").history
    skipped = [h["overflow_skipped"] for h in hist]
    first_ok = skipped.index(0.0)
    assert first_ok >= 1 and not any(skipped[first_ok:])
    assert [h["loss_scale"] for h in hist[:first_ok + 1]] == [2.0 ** (24 - k) for k in range(first_ok + 1)]
    assert torch.isfinite(_weights(model)).all() and not torch.equal(_weights(model), init)


def test_resume_restores_the_loss_scale(tiny_dir, tmp_path, high_initial_scale):
    pairs = _pairs()
    ref = compute_reference_logps(_load(tiny_dir), pairs, pad_id=0, batch_size=4, precision="fp16")
    cfg = _cfg(precision="fp16", max_steps=14, save_steps=1)
    full = _load(tiny_dir)
    train(full, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "full")

    def crash(step, metrics):
        if step == 5:  # after some skipped steps: the scale is no longer the initial one
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train(_load(tiny_dir), pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "crash",
              progress=crash)
    model = _load(tiny_dir)
    res = train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "crash")
    assert res.resumed_from == 4 and res.history[4]["loss_scale"] < 2.0 ** 24
    assert torch.equal(_weights(model), _weights(full))
