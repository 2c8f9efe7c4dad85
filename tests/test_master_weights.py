"""bf16 model weights train through fp32 master copies: updates below bf16's resolution are kept, the
run tracks an fp32 run, and a resumed run ends with the same weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from data_contracts.config import LossConfig, TrainConfig
from dpo_engine.training import MasterWeights
from dpo_engine.training import train
from test_trainer import _pairs, _ref, _weights
from tiny import tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m")


def _run(d, pairs, ref, out, dtype, **kw):
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    cfg = TrainConfig(**{"learning_rate": 1e-6, "max_steps": 6, "seed": 1, "per_device_train_batch_size": 4,
                         "max_grad_norm": 0.0, "lr_scheduler_type": "constant", **kw})
    res = train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=out)
    return model, res


def _update_vs(update, reference):
    """(cosine, norm ratio) of a weight update against the fp32 run's."""
    cos = torch.nn.functional.cosine_similarity(update, reference, dim=0).item()
    return cos, (update.norm() / reference.norm()).item()


def test_bf16_weights_follow_fp32_training_only_with_master_weights(tiny_dir, tmp_path):
    pairs = _pairs()
    ref = _ref(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), pairs)
    init32 = _weights(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32))
    init16 = init32.bfloat16().float()
    fp32, _ = _run(tiny_dir, pairs, ref, tmp_path / "fp32", torch.float32, max_steps=3)
    master, _ = _run(tiny_dir, pairs, ref, tmp_path / "master", torch.bfloat16, save_steps=3)
    plain, _ = _run(tiny_dir, pairs, ref, tmp_path / "plain", torch.bfloat16, master_weights=False)
    assert all(p.dtype == torch.bfloat16 for p in master.parameters())
    # the fp32 master copies after 3 steps (kept in the step-3 checkpoint) against 3 fp32 steps
    blob = torch.load(tmp_path / "master" / "checkpoints" / "step-3" / "trainer.pt", weights_only=True)
    copies = torch.cat([t.flatten() for t in blob["master"]])
    u32 = _weights(fp32) - init32
    cos_m, ratio_m = _update_vs(copies - init16, u32)
    assert cos_m > 0.99 and 0.95 < ratio_m < 1.05
    # stepped in bf16 directly, 6 steps of 1e-6 leave most weights where they were (measured: 98%)
    cos_p, ratio_p = _update_vs(_weights(plain).float() - init16, u32)
    assert (_weights(plain).float() == init16).float().mean() > 0.9 and cos_p < 0.5
    assert _update_vs(_weights(master).float() - init16, u32)[0] > cos_p


def test_resume_restores_the_master_copies(tiny_dir, tmp_path):
    pairs = _pairs()
    ref = _ref(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), pairs)
    full, _ = _run(tiny_dir, pairs, ref, tmp_path / "full", torch.bfloat16, save_steps=2)

    def crash(step, metrics):
        if step == 5:
            raise KeyboardInterrupt("simulated crash")

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    cfg = TrainConfig(learning_rate=1e-6, max_steps=6, seed=1, per_device_train_batch_size=4, max_grad_norm=0.0,
                      lr_scheduler_type="constant",
                      save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "crash",
              progress=crash)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    res = train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "crash")
    assert res.resumed_from == 4
    assert torch.equal(_weights(model), _weights(full))


def test_accumulation_sums_in_fp32():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    mw = MasterWeights([p])
    assert mw.active and mw.optimizer_params()[0].dtype == torch.float32
    for _ in range(3):
        p.grad = torch.full((4,), 1e-3, dtype=torch.bfloat16)
        mw.grads_in()
        assert p.grad is None
    assert torch.allclose(mw.master[0].grad, torch.full((4,), 3e-3), rtol=1e-2)
    fp32 = torch.nn.Parameter(torch.ones(2))
    assert not MasterWeights([fp32]).active and MasterWeights([fp32]).optimizer_params()[0] is fp32
    assert not MasterWeights([p], enabled=False).active
