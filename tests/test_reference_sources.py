"""Reference sources: an explicit reference model (online in training, or precomputed from a model
other than the policy's base) and TR-DPO (sync_ref_model), refused with the precomputed cache."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from data_contracts.config import ConfigError, LossConfig, ReferenceConfig, TrainConfig, load_config
from dpo_engine.reference import compute_reference_logps
from dpo_engine.training import TrainingError, train
from test_trainer import _pairs
from tiny import tiny_model_dir


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    return tiny_model_dir(root / "policy", seed=0), tiny_model_dir(root / "other", seed=1)


def _load(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _cfg(**kw):
    return TrainConfig(**{"learning_rate": 1e-2, "max_steps": 4, "seed": 3, "per_device_train_batch_size": 4,
                          **kw})


# ------------------------------------------------------------------------------ config

def test_tr_dpo_config_fields_and_refusals():
    ref = load_config(overrides={"reference.source": "model", "reference.sync_ref_model": True}).reference
    assert (ref.ref_model_mixup_alpha, ref.ref_model_sync_steps) == (0.6, 512)  # TRL's defaults
    for source in ("precomputed", "adapter_disabled"):
        with pytest.raises(ConfigError) as e:
            load_config(overrides={"reference.source": source, "reference.sync_ref_model": True,
                                   "peft.enabled": True})
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("config error: reference")
        for name in ("reference.sync_ref_model", "reference.ref_model_mixup_alpha",
                     "reference.ref_model_sync_steps", "reference.source=model", f"reference.source={source}"):
            assert name in msg, name
    assert "precomputed cache" in str(pytest.raises(ConfigError, load_config, overrides={
        "reference.sync_ref_model": True}).value)
    with pytest.raises(ConfigError, match="reference.ref_model_mixup_alpha"):
        load_config(overrides={"reference.source": "model", "reference.ref_model_mixup_alpha": 1.5})
    with pytest.raises(ConfigError, match="reference.ref_model_sync_steps"):
        load_config(overrides={"reference.source": "model", "reference.ref_model_sync_steps": 0})
    with pytest.raises(ConfigError, match="reference.model_path has no effect"):
        load_config(overrides={"reference.source": "adapter_disabled", "reference.model_path": "/x"})
    for name in ("source", "model_path", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps"):
        assert ReferenceConfig.model_fields[name].description, name


def test_cli_refuses_tr_dpo_with_the_cache_in_one_line(tmp_path, capsys):
    from flows.cli import main

    code = main(["train", "--run-dir", str(tmp_path / "r"), "--set", "reference.sync_ref_model=true"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert err.startswith("error: config error: reference") and "reference.sync_ref_model" in err


# ------------------------------------------------------------------------------ online reference model

def test_online_reference_model_equals_its_precomputed_log_probs(dirs, tmp_path):
    policy_dir, other_dir = dirs
    pairs = _pairs(n=8)
    other = _load(other_dir)
    before = _params(other)
    online = _load(policy_dir)
    train(online, pairs, other, loss_cfg=LossConfig(), cfg=_cfg(max_steps=2), pad_id=0, out_dir=tmp_path / "online")
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))  # frozen
    assert all(p.grad is None for p in other.parameters())

    cached = _load(policy_dir)
    train(cached, pairs, compute_reference_logps(_load(other_dir), pairs, pad_id=0, batch_size=5),
          loss_cfg=LossConfig(), cfg=_cfg(max_steps=2), pad_id=0, out_dir=tmp_path / "cached")
    for a, b in zip(online.parameters(), cached.parameters()):
        assert torch.allclose(a, b, atol=1e-5)

    own = _load(policy_dir)  # the policy's own base as reference gives other weights: the model is used
    train(own, pairs, compute_reference_logps(_load(policy_dir), pairs, pad_id=0, batch_size=5),
          loss_cfg=LossConfig(), cfg=_cfg(max_steps=2), pad_id=0, out_dir=tmp_path / "own")
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(online.parameters(), own.parameters()))


def test_reference_model_must_share_the_vocabulary(dirs, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(TrainingError, match="vocabulary has 50 tokens"):
        train(_load(dirs[0]), _pairs(n=4), small, loss_cfg=LossConfig(), cfg=_cfg(), pad_id=0, out_dir=tmp_path)


# ------------------------------------------------------------------------------ TR-DPO

def _tr_dpo_run(policy_dir, pairs, out_dir, crash_at=None, **ref_kw):
    policy, ref = _load(policy_dir), _load(policy_dir)  # reference: a copy of the initial policy
    seen = {0: _params(policy)}

    def progress(step, metrics):
        seen[step] = _params(policy)
        if step == crash_at:
            raise KeyboardInterrupt

    ref_cfg = ReferenceConfig(source="model", **{"sync_ref_model": True, "ref_model_sync_steps": 2,
                                                 "ref_model_mixup_alpha": 0.6, **ref_kw})
    res = train(policy, pairs, ref, loss_cfg=LossConfig(), cfg=_cfg(save_steps=2), pad_id=0, out_dir=out_dir,
                progress=progress, ref_cfg=ref_cfg)
    return policy, ref, seen, res


def test_tr_dpo_sync_follows_the_formula(dirs, tmp_path):
    pairs = _pairs(n=8)
    policy, ref, seen, res = _tr_dpo_run(dirs[0], pairs, tmp_path / "sync")
    a = 0.6
    want = seen[0]  # the reference starts as the initial policy
    for step in (2, 4):  # every ref_model_sync_steps optimizer steps: ref = a * policy + (1 - a) * ref
        want = [a * p + (1 - a) * r for p, r in zip(seen[step], want)]
    for got, w in zip(ref.parameters(), want):
        assert torch.allclose(got, w, atol=1e-7)
    assert not all(torch.equal(got, w) for got, w in zip(ref.parameters(), seen[0]))

    # the synced reference changes the losses after the first sync only
    _, _, _, plain = _tr_dpo_run(dirs[0], pairs, tmp_path / "plain", sync_ref_model=False)
    assert [h["loss"] for h in res.history[:2]] == [h["loss"] for h in plain.history[:2]]
    assert res.history[2]["loss"] != pytest.approx(plain.history[2]["loss"], abs=1e-6)

    # alpha = 1: the reference becomes the policy at each sync
    policy, ref, seen, _ = _tr_dpo_run(dirs[0], pairs, tmp_path / "copy", ref_model_mixup_alpha=1.0)
    assert all(torch.equal(r, p) for r, p in zip(ref.parameters(), seen[4]))


def test_tr_dpo_resume_restores_the_synced_reference(dirs, tmp_path):
    pairs = _pairs(n=8)
    policy, ref, _, _ = _tr_dpo_run(dirs[0], pairs, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        _tr_dpo_run(dirs[0], pairs, tmp_path / "killed", crash_at=3)
    ckpt = tmp_path / "killed" / "checkpoints" / "step-2"
    assert (ckpt / "reference" / "model.safetensors").is_file()
    policy2, ref2, _, res = _tr_dpo_run(dirs[0], pairs, tmp_path / "killed")
    assert res.resumed_from == 2
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), policy2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), ref2.parameters()))


def test_trainer_refuses_tr_dpo_without_an_online_model(dirs, tmp_path):
    pairs = _pairs(n=4)
    cache = compute_reference_logps(_load(dirs[0]), pairs, pad_id=0, batch_size=4)
    sync = ReferenceConfig(source="model", sync_ref_model=True)
    with pytest.raises(TrainingError, match="sync_ref_model needs an online reference model"):
        train(_load(dirs[0]), pairs, cache, loss_cfg=LossConfig(), cfg=_cfg(), pad_id=0, out_dir=tmp_path,
              ref_cfg=sync)
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = _load(dirs[0]).config
    deeper = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": 3}))
    with pytest.raises(TrainingError, match="exactly the policy's parameters"):
        train(_load(dirs[0]), pairs, deeper, loss_cfg=LossConfig(), cfg=_cfg(), pad_id=0, out_dir=tmp_path,
              ref_cfg=sync)


# ------------------------------------------------------------------------------ the stages

def test_stages_with_a_reference_model_path(dpo_home, dirs, monkeypatch):
    """precompute from a model other than the policy's base; train against it online, with TR-DPO;
    evaluate generates with that same reference model."""
    from dpo_engine.reference import read_cache
    from dpo_engine.stages import precompute, train as train_stage, validate
    from data_contracts.validation import read_valid

    policy_dir, other_dir = dirs
    base = {"model.name_or_path": str(policy_dir), "data.train_limit": 8, "data.eval_limit": 4,
            "data.max_length": 256, "train.per_device_train_batch_size": 4, "train.max_steps": 2,
            "train.learning_rate": 1e-2, "reference.batch_size": 8, "registry.experiment": "refsrc"}
    cfg = load_config(overrides={**base, "reference.model_path": str(other_dir)})
    run_dir = dpo_home / "runs" / "ref"
    run_dir.mkdir(parents=True)
    v = validate.run(cfg, run_dir)
    pre = precompute.run(cfg, run_dir, v)
    assert pre["reference_model"] == str(other_dir.resolve())
    rows = read_valid(v["train"]["valid"])
    got = read_cache(Path(pre["train_ref"])).set_index("example_id").loc[rows["example_id"]]
    want = compute_reference_logps(_load(other_dir), rows, pad_id=0, batch_size=8)
    assert torch.allclose(torch.tensor(got["ref_chosen_logps"].to_numpy()),
                          torch.tensor(want["ref_chosen_logps"].to_numpy()), atol=1e-6)
    own = precompute.cache_key(load_config(overrides=base), v, "train")
    assert pre["train_ref_key"] != own  # a different reference model is a different cache entry

    online = load_config(overrides={**base, "reference.source": "model", "reference.model_path": str(other_dir),
                                    "reference.sync_ref_model": True, "reference.ref_model_sync_steps": 1})
    pre2 = precompute.run(online, run_dir, v)
    assert pre2["train_ref"] is None and pre2["eval_ref"] == pre["eval_ref"]  # eval split only, same model
    res = train_stage.run(online, run_dir, v, pre2)
    hist = json.loads(Path(res["history"]).read_text())
    assert res["steps"] == 2 and len(hist) == 2
    assert train_stage.key(online, pre2) != train_stage.key(
        online.model_copy(update={"reference": online.reference.model_copy(update={"ref_model_mixup_alpha": 0.5})}),
        pre2)

    from dpo_engine.stages import evaluate
    seen = []
    real = evaluate.load_reference_model
    monkeypatch.setattr(evaluate, "load_reference_model",
                        lambda c, path, policy, dev: seen.append(path) or real(c, path, policy, dev))
    short = online.model_copy(update={"eval": online.eval.model_copy(
        update={"num_prompts": 1, "max_new_tokens": 2, "judge": None})})
    evaluate.run(short, run_dir, v, pre2, res)
    assert seen == [str(other_dir)]
