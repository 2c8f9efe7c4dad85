"""The step-1 reference check (issue 18): with the reference equal to the starting policy, step 1's
log-ratios are 0 (rewards 0, sigmoid loss ln 2) within the precision's rounding; a reference computed
differently (shifted log-probs, another model's cache) stops the run at step 1 in one line, before any
update; honest runs (padded, packed, LD-DPO, WPO, other losses, an online copy, a fresh adapter) pass."""

import copy
import json
import math

import pytest
import torch

from data_contracts.config import LossConfig, TrainConfig, load_config
from dpo_engine.reference import compute_reference_logps
from dpo_engine.training import TrainingError, train
from dpo_engine.training.sanity import compute_dtype, reference_is_start, runtime_skip, tolerance
from test_reference_sources import dirs  # noqa: F401  (the fixture: a tiny policy and another model)
from test_trainer import _load, _pairs


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _cfg(**kw):
    return TrainConfig(**{"learning_rate": 1e-3, "max_steps": 1, "seed": 1, "per_device_train_batch_size": 3,
                          "gradient_accumulation_steps": 2, **kw})


def _run(model, pairs, ref, out, loss=None, **kw):
    return train(model, pairs, ref, loss_cfg=loss or LossConfig(), cfg=_cfg(**kw), pad_id=0, out_dir=out,
                 reference_is_start=True)


HONEST = {
    "padded": ({}, {}),
    "padding_free": ({}, {"padding_free": True}),
    "pad_to_multiple_of": ({}, {"pad_to_multiple_of": 16}),
    "ld_dpo": ({"ld_alpha": 0.5}, {}),
    "wpo": ({"use_weighting": True}, {}),
    "ipo": ({"loss_type": "ipo"}, {}),
    "cdpo": ({"label_smoothing": 0.2}, {}),
    "mpo": ({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, {}),
}


@pytest.mark.parametrize("name", list(HONEST))
def test_honest_fp32_run_passes_with_log_ratios_far_below_the_tolerance(dirs, tmp_path, name):
    """The precompute's batches (5 length-sorted sequences) against training micro-batches of 3 pairs:
    other padding and neighbours, same log-probs up to fp32 rounding."""
    loss_kw, train_kw = HONEST[name]
    loss = LossConfig(**loss_kw)
    pairs = _pairs(n=12)
    ref = compute_reference_logps(_load(dirs[0]), pairs, pad_id=0, batch_size=5, ld_alpha=loss.ld_alpha)
    res = _run(_load(dirs[0]), pairs, ref, tmp_path, loss, **train_kw)
    got = res.reference_check
    assert got["precision"] == "float32" and got["tolerance"] == 1e-3
    assert got["sequences"] == 12 and got["over_tolerance"] == 0  # step 1: 2 micro-batches x 3 pairs x 2
    assert got["max_nats_per_token"] < 1e-5  # honest fp32 noise: 100x below the tolerance
    if name in ("padded", "cdpo"):  # the plain sigmoid loss: ln 2 for every pair
        assert got["max_loss_minus_ln2"] < 1e-6
        assert abs(res.history[0]["loss"] - math.log(2)) < 1e-6
    assert abs(got["rewards/chosen"]) < 1e-6 and abs(got["rewards/rejected"]) < 1e-6


def test_online_copy_and_fresh_adapter_pass(dirs, tmp_path):
    pairs = _pairs(n=6)
    policy = _load(dirs[0])
    res = _run(policy, pairs, copy.deepcopy(policy), tmp_path / "online")
    assert res.reference_check["max_nats_per_token"] < 1e-5
    from dpo_engine.modeling import apply_adapter
    from data_contracts.config import PeftConfig
    peft_model = apply_adapter(_load(dirs[0]), PeftConfig(enabled=True, r=4), seed=0)
    res = _run(peft_model, pairs, None, tmp_path / "adapter")  # the adapter off: the reference
    assert res.reference_check["max_nats_per_token"] < 1e-5
    cached = compute_reference_logps(_load(dirs[0]), pairs, pad_id=0, batch_size=4)
    res = _run(apply_adapter(_load(dirs[0]), PeftConfig(enabled=True, r=4), seed=0), pairs, cached,
               tmp_path / "adapter-cache")  # a fresh LoRA (B = 0) against the base's cache
    assert res.reference_check["over_tolerance"] == 0


@pytest.mark.parametrize("how", ["shifted", "other_model"])
def test_mismatched_reference_stops_at_step_1_before_any_update(dirs, tmp_path, how):
    pairs = _pairs(n=6)
    if how == "shifted":  # e.g. a template or tokenization that adds a token's worth of log-prob
        ref = compute_reference_logps(_load(dirs[0]), pairs, pad_id=0, batch_size=4)
        ref["ref_chosen_logps"] -= 0.5
    else:  # a cache made for another model
        ref = compute_reference_logps(_load(dirs[1]), pairs, pad_id=0, batch_size=4)
    model = _load(dirs[0])
    before = _flat(model)
    with pytest.raises(TrainingError) as e:
        _run(model, pairs, ref, tmp_path, per_device_train_batch_size=2)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("reference check at step 1")
    for cause in ("tokenization", "chat template", "truncation", "precision/dtype", "another model",
                  "train.check_reference_at_start=false", "float32 tolerance 0.001", "nats per token"):
        assert cause in msg, cause
    worst = float(msg.split("by up to ")[1].split(" nats")[0])
    assert worst > 0.05  # the measured discrepancy is named (0.5 nats over at most 6 tokens)
    print(msg)
    assert ("4 of 8 sequences" in msg) if how == "shifted" else ("8 of 8 sequences" in msg)  # 2 x 2 pairs
    assert torch.equal(_flat(model), before)  # stopped before the optimizer step
    assert not list((tmp_path / "checkpoints").glob("step-*"))  # and before any checkpoint


def test_check_is_off_when_the_reference_is_not_the_start(dirs, tmp_path):
    pairs = _pairs(n=6)
    shifted = compute_reference_logps(_load(dirs[0]), pairs, pad_id=0, batch_size=4)
    shifted["ref_rejected_logps"] += 1.0
    kw = dict(loss_cfg=LossConfig(), pad_id=0)
    res = train(_load(dirs[0]), pairs, shifted, cfg=_cfg(), out_dir=tmp_path / "a", **kw)  # not stated equal
    assert res.reference_check is None
    res = train(_load(dirs[0]), pairs, shifted, cfg=_cfg(check_reference_at_start=False), out_dir=tmp_path / "b",
                reference_is_start=True, **kw)
    assert res.reference_check is None and res.steps == 1
    # a resumed training: its weights moved, the check no longer holds
    honest = compute_reference_logps(_load(dirs[0]), pairs, pad_id=0, batch_size=4)
    with pytest.raises(KeyboardInterrupt):  # killed at step 2, after step 1's checkpoint
        train(_load(dirs[0]), pairs, honest, cfg=_cfg(save_steps=1, max_steps=3), out_dir=tmp_path / "c",
              reference_is_start=True, progress=_stop_after(2), **kw)
    res = train(_load(dirs[0]), pairs, shifted, cfg=_cfg(save_steps=1, max_steps=3), out_dir=tmp_path / "c",
                reference_is_start=True, **kw)
    assert res.resumed_from == 1 and res.reference_check == {"skipped": "resumed from step 1"}
    # dropout left on: the policy's forward is noisy, the reference's is not
    noisy = _load(dirs[0])
    noisy.model.layers[0].mlp.act_fn = torch.nn.Sequential(torch.nn.Dropout(0.1), noisy.model.layers[0].mlp.act_fn)
    res = train(noisy, pairs, shifted, cfg=_cfg(disable_dropout=False), out_dir=tmp_path / "d",
                reference_is_start=True, **kw)
    assert "dropout is active" in res.reference_check["skipped"]
    attention = _load(dirs[0])
    attention.config.attention_dropout = 0.1  # Llama's attention dropout: a rate in the config, no module
    res = train(attention, pairs, shifted, cfg=_cfg(disable_dropout=False), out_dir=tmp_path / "e",
                reference_is_start=True, **kw)
    assert "attention_dropout" in res.reference_check["skipped"]


def _stop_after(n):
    def progress(step, metrics):
        if step == n:
            raise KeyboardInterrupt
    return progress


def test_tolerance_follows_the_compute_precision(dirs):
    assert tolerance(torch.float32) == 1e-3
    assert tolerance(torch.float16) == pytest.approx(16 * 2 ** -11)
    assert tolerance(torch.bfloat16) == pytest.approx(16 * 2 ** -8)
    model = _load(dirs[0])
    cpu = torch.device("cpu")
    assert compute_dtype(model, None, cpu) == torch.float32
    assert compute_dtype(model, torch.bfloat16, cpu) == torch.bfloat16  # autocast
    assert compute_dtype(model.to(torch.bfloat16), None, cpu) == torch.bfloat16  # model.dtype=bfloat16
    assert runtime_skip(model, 0) is None


def test_bf16_weights_pass_with_the_bf16_tolerance(dirs, tmp_path):
    """model.dtype=bfloat16 (master weights on): the reference precomputed in bf16, its noise within
    the bf16 tolerance, and well above the fp32 one (the tolerance must follow the precision)."""
    pairs = _pairs(n=12)
    ref = compute_reference_logps(_load(dirs[0]).to(torch.bfloat16), pairs, pad_id=0, batch_size=5)
    res = _run(_load(dirs[0]).to(torch.bfloat16), pairs, ref, tmp_path)
    got = res.reference_check
    print(got)
    assert got["precision"] == "bfloat16" and got["over_tolerance"] == 0
    assert got["max_nats_per_token"] < got["tolerance"] / 4


def test_stage_condition(dirs):
    """When the train stage states that the reference is the starting policy."""
    def ok(**over):
        return reference_is_start(load_config(overrides=over), str(dirs[0]))

    assert ok() == (True, "")
    assert ok(**{"reference.model_path": str(dirs[0])})[0]  # the base named explicitly
    assert ok(**{"reference.source": "model"})[0]  # an online copy of the initial weights
    assert ok(**{"peft.enabled": True})[0]  # a fresh adapter is the identity
    assert ok(**{"peft.enabled": True, "reference.source": "adapter_disabled"})[0]
    for over, why in [({"reference.model_path": str(dirs[1])}, "another model"),
                      ({"peft.enabled": True, "peft.adapter_path": "/a"}, "trained adapter"),
                      ({"peft.enabled": True, "peft.extra": {"init_lora_weights": "gaussian"}}, "identity"),
                      ({"loss.loss_type": "simpo"}, "does not use the reference"),
                      ({"train.check_reference_at_start": False}, "check_reference_at_start=false")]:
        got = ok(**over)
        assert not got[0] and why in got[1], (over, got)


def test_train_stage_stops_on_a_cache_made_for_another_model(dpo_home, dirs):
    """The stages: a normal run passes and records what step 1 measured; training against a cache
    precomputed from another model (a stale precompute result) stops at step 1 with the message."""
    from dpo_engine.stages import precompute, train as train_stage, validate

    base = {"model.name_or_path": str(dirs[0]), "data.train_limit": 8, "data.eval_limit": 4,
            "data.max_length": 256, "train.per_device_train_batch_size": 4, "train.max_steps": 1,
            "reference.batch_size": 3, "registry.experiment": "refcheck"}
    cfg = load_config(overrides=base)
    run_dir = dpo_home / "runs" / "refcheck"
    run_dir.mkdir(parents=True)
    v = validate.run(cfg, run_dir)
    res = train_stage.run(cfg, run_dir, v, precompute.run(cfg, run_dir, v))
    check = res["reference_check"]
    assert check["over_tolerance"] == 0 and check["sequences"] == 8 and check["max_nats_per_token"] < 1e-5
    assert json.loads((run_dir / "train.json").read_text())["reference_check"] == check

    stale = precompute.run(load_config(overrides={**base, "reference.model_path": str(dirs[1])}), run_dir, v)
    with pytest.raises(TrainingError, match=r"reference check at step 1: .* nats per token .*tokenization"):
        train_stage.run(load_config(overrides={**base, "train.learning_rate": 2e-6}), run_dir, v, stale)
    assert not list((run_dir / "train" / "checkpoints").glob("step-*"))
