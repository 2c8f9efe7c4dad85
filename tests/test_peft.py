"""PEFT adapters: config, fused head through wrappers, adapter-disabled reference, export, resume."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from data_contracts.config import ConfigError, LossConfig, ModelConfig, PeftConfig, TrainConfig, load_config
from dpo_engine.modeling import apply_adapter, check_config, export_model, peft_config, reference_mode
from dpo_engine.modeling import lm_body_and_head, pair_batch, sequence_logps
from dpo_engine.modeling import load_model
from dpo_engine.reference import compute_reference_logps
from dpo_engine.training import TrainingError, train
from test_trainer import _pairs
from tiny import tiny_model_dir, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m")


def _load(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def _lora(d, **kw):
    cfg = PeftConfig(enabled=True, r=4, lora_alpha=8, **kw)
    base = _load(d)
    torch.manual_seed(0)  # LoRA A is initialised at random
    return apply_adapter(base, cfg)


def _flat(params):
    return torch.cat([p.detach().flatten() for p in params])


def _naive_logps(model, batch):
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    tok = logits.log_softmax(-1).gather(2, batch.targets[..., None]).squeeze(-1)
    return (tok * batch.predict_mask).sum(1)


def test_config_sections_and_cross_checks(tmp_path):
    cfg = load_config(overrides={"peft.enabled": True, "peft.r": 8, "peft.extra": {"use_rslora": True},
                                 "reference.source": "adapter_disabled",
                                 "model.init_kwargs": {"attn_implementation": "eager"}})
    check_config(cfg)
    lc = peft_config(cfg.peft)
    assert isinstance(lc, LoraConfig) and lc.r == 8 and lc.use_rslora and lc.target_modules == "all-linear"
    ia3 = peft_config(PeftConfig(enabled=True, peft_type="IA3", target_modules=["q_proj", "v_proj"],
                                 extra={"feedforward_modules": []}))
    assert type(ia3).__name__ == "IA3Config"
    with pytest.raises(ConfigError, match="adapter_disabled needs peft.enabled"):
        check_config(load_config(overrides={"reference.source": "adapter_disabled"}))
    with pytest.raises(ConfigError, match="adapter_config.json"):
        check_config(load_config(overrides={"peft.enabled": True, "peft.adapter_path": str(tmp_path)}))
    with pytest.raises(ConfigError, match="peft"):
        peft_config(PeftConfig(enabled=True, extra={"no_such_field": 1}))
    with pytest.raises(ConfigError, match="peft.export"):
        load_config(overrides={"peft.export": "both"})


def test_fused_head_through_peft_and_ddp_wrappers(tiny_dir, tmp_path):
    model = _lora(tiny_dir, extra={"init_lora_weights": False})  # random B: the adapter matters
    rows = _pairs(n=3).to_dict("records")
    batch = pair_batch(rows, 0)
    body, head = lm_body_and_head(model)
    assert type(body).__name__ == "LlamaModel" and head is model.get_base_model().lm_head
    with torch.no_grad():
        fused = sequence_logps(model, batch)["logps"].double()
        assert torch.allclose(fused, _naive_logps(model, batch), atol=1e-5)
        with reference_mode(model):
            disabled = sequence_logps(model, batch)["logps"].double()
        base = sequence_logps(_load(tiny_dir), batch)["logps"].double()
    assert torch.allclose(disabled, base, atol=1e-5) and not torch.allclose(fused, base, atol=1e-3)

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        with torch.no_grad():
            assert torch.allclose(sequence_logps(ddp, batch)["logps"].double(), fused, atol=1e-6)
            with reference_mode(ddp):
                assert torch.allclose(sequence_logps(ddp, batch)["logps"].double(), base, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_lora_training_with_adapter_disabled_reference(tiny_dir, tmp_path):
    pairs = _pairs()
    cfg = TrainConfig(learning_rate=1e-2, max_steps=3, seed=1, per_device_train_batch_size=4)
    model = _lora(tiny_dir)
    base_before = _flat(p for n, p in model.named_parameters() if "lora_" not in n)
    lora_before = _flat(p for n, p in model.named_parameters() if "lora_" in n)
    res = train(model, pairs, None, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "a")
    assert abs(res.history[0]["loss"] - 0.693147) < 1e-5  # adapter starts as identity (B = 0)
    assert torch.equal(base_before, _flat(p for n, p in model.named_parameters() if "lora_" not in n))
    assert not torch.allclose(lora_before, _flat(p for n, p in model.named_parameters() if "lora_" in n))

    # the same run against a precomputed reference of the base model gives the same weights
    ref = compute_reference_logps(_load(tiny_dir), pairs, pad_id=0, batch_size=5)
    other = _lora(tiny_dir)
    train(other, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "b")
    assert torch.allclose(_flat(model.parameters()), _flat(other.parameters()), atol=1e-6)

    with pytest.raises(TrainingError, match="no adapter"):
        train(_load(tiny_dir), pairs, None, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "c")


def test_optimizer_gets_only_trainable_params_of_a_prebuilt_peft_model(tiny_dir, tmp_path, monkeypatch):
    """Python API: an already-built PeftModel is trained as it is."""
    model = get_peft_model(_load(tiny_dir), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    seen = {}
    real = torch.optim.AdamW

    def spy(params, **kw):
        seen["params"] = list(params)
        return real(seen["params"], **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    train(model, _pairs(), None, loss_cfg=LossConfig(), pad_id=0, out_dir=tmp_path,
          cfg=TrainConfig(learning_rate=1e-3, max_steps=1, per_device_train_batch_size=8))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(seen["params"]) == len(trainable) == 4  # lora_A, lora_B of q_proj in 2 layers
    assert all(p.requires_grad for p in seen["params"])


def test_export_merged_adapter_and_continue_training(tiny_dir, tmp_path):
    tok = tiny_tokenizer()
    pairs = _pairs()
    cfg = TrainConfig(learning_rate=1e-2, max_steps=2, seed=1, per_device_train_batch_size=8)
    model = _lora(tiny_dir)
    train(model, pairs, None, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "t")
    batch = pair_batch(pairs.to_dict("records"), 0)
    with torch.no_grad():
        want = sequence_logps(model, batch)["logps"]

    adapter = export_model(model, tok, tmp_path / "adapter", "adapter", base_model_path=str(tiny_dir))
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    cont = apply_adapter(_load(tiny_dir), PeftConfig(enabled=True, adapter_path=str(adapter)))
    assert isinstance(cont, PeftModel) and any(p.requires_grad for p in cont.parameters())
    with torch.no_grad():
        assert torch.allclose(sequence_logps(cont, batch)["logps"], want, atol=1e-5)
    res = train(cont, pairs, None, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "t2")
    assert res.history[0]["loss"] < 0.69  # continues from the trained adapter, not from identity

    merged = export_model(model, tok, tmp_path / "merged", "merged")
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    plain = load_model(ModelConfig(), str(merged))
    assert not isinstance(plain, PeftModel)
    with torch.no_grad():
        assert torch.allclose(sequence_logps(plain, batch)["logps"], want, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_peft_checkpoint_resume_gives_the_same_weights(tiny_dir, tmp_path, dropout):
    """With LoRA dropout the resumed run must also continue the random streams where the checkpoint
    left them (the checkpoint holds the RNG states), else its dropout masks differ."""
    pairs = _pairs()
    cfg = TrainConfig(learning_rate=1e-2, max_steps=4, seed=1, save_steps=1, per_device_train_batch_size=2)
    full = _lora(tiny_dir, lora_dropout=dropout)
    train(full, pairs, None, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "full")

    def crash(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_lora(tiny_dir, lora_dropout=dropout), pairs, None, loss_cfg=LossConfig(), cfg=cfg, pad_id=0,
              out_dir=tmp_path / "crash", progress=crash)
    torch.manual_seed(123)  # whatever the new process's generators hold
    model = _lora(tiny_dir, lora_dropout=dropout)
    torch.rand(7)
    res = train(model, pairs, None, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "crash")
    assert res.resumed_from == 2
    assert torch.equal(_flat(model.parameters()), _flat(full.parameters()))
    if dropout:  # the LoRA dropout stayed on (train.disable_dropout leaves adapters' dropout alone)
        assert any(m.p == dropout for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout))


def test_model_init_kwargs_reach_from_pretrained(tiny_dir):
    cfg = ModelConfig(init_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"})
    model = load_model(cfg, str(tiny_dir))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_train_stage_with_lora_adapter_disabled_reference_exports_merged(dpo_home, tmp_path):
    """validate -> precompute (eval split only) -> train (LoRA, no train cache) -> merged model/."""
    import json
    from pathlib import Path

    from dpo_engine.stages import precompute, train as train_stage, validate

    model_dir = tiny_model_dir(tmp_path / "tiny")
    cfg = load_config(overrides={
        "model.name_or_path": str(model_dir), "data.train_limit": 8, "data.eval_limit": 4,
        "data.max_length": 256, "train.per_device_train_batch_size": 4, "train.max_steps": 2,
        "train.learning_rate": 1e-2, "train.padding_free": True, "reference.source": "adapter_disabled",
        "peft.enabled": True, "peft.r": 4, "model.init_kwargs": {"attn_implementation": "eager"}})
    run_dir = dpo_home / "runs" / "peft"
    run_dir.mkdir(parents=True)
    v = validate.run(cfg, run_dir)
    pre = precompute.run(cfg, run_dir, v)
    assert pre["train_ref"] is None and pre["eval_ref"] is not None
    res = train_stage.run(cfg, run_dir, v, pre)
    out = Path(res["model_dir"])
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    hist = json.loads(Path(res["history"]).read_text())
    assert abs(hist[0]["loss"] - 0.693147) < 1e-4
    merged = load_model(ModelConfig(), str(out))
    assert not torch.allclose(_flat(merged.parameters()), _flat(_load(model_dir).parameters()))
