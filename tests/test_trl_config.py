"""Bring a TRL config: a `trl dpo --config` YAML translated into our config, every key accounted for
(mapped, or ignored with the reason printed, or refused by name), our nested form never misread, errors
naming the TRL key, `dpo config from-trl`/`show`, and `dpo run --trl-config FILE` end to end."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from data_contracts.config import ConfigError, load_config
from data_contracts.config.trl import detect_form, from_trl, translate_trl
from data_contracts.config.trl_names import KNOWN
from tiny import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]

# Written by hand in the style of TRL's CLI docs ("trl dpo --config dpo.yaml": one flat name per
# key, the value under it) from trl/scripts/dpo.py's LoRA example, plus DPOConfig's loss fields.
TRL_DOCS_YAML = """\
# trl dpo --config dpo.yaml
model_name_or_path:
  Qwen/Qwen2-0.5B-Instruct
dataset_name:
  trl-lib/ultrafeedback_binarized
learning_rate:
  5.0e-6
num_train_epochs:
  1
per_device_train_batch_size:
  2
max_steps:
  1000
gradient_accumulation_steps:
  8
eval_strategy:
  steps
eval_steps:
  50
output_dir:
  Qwen2-0.5B-DPO
remove_unused_columns:
  false
use_peft:
  true
lora_r:
  32
lora_alpha:
  16
lora_target_modules:
  - all-linear
beta:
  0.1
loss_type:
  - sigmoid
  - bco_pair
  - sft
loss_weights:
  - 0.8
  - 0.2
  - 1.0
max_length:
  1024
truncation_mode:
  keep_start
bf16:
  true
gradient_checkpointing:
  true
precompute_ref_log_probs:
  true
precompute_ref_batch_size:
  32
lr_scheduler_type:
  cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1
warmup_steps:
  0.1
adam_epsilon:
  1.0e-7
optim:
  adamw_torch_fused
logging_steps:
  10
save_steps:
  100
save_total_limit:
  3
seed:
  0
model_init_kwargs:
  torch_dtype: bfloat16
  attn_implementation: sdpa
report_to:
  none
push_to_hub:
  false
"""

EXPECTED = {
    "data": {"source": "trl-lib/ultrafeedback_binarized@train",
             "eval_source": "trl-lib/ultrafeedback_binarized@test",  # eval_strategy steps: TRL's test split
             "max_length": 1024, "truncation_mode": "keep_start"},
    "model": {"name_or_path": "Qwen/Qwen2-0.5B-Instruct", "dtype": "bfloat16",
              "init_kwargs": {"attn_implementation": "sdpa"}},
    "peft": {"enabled": True, "r": 32, "lora_alpha": 16, "target_modules": "all-linear", "lora_dropout": 0.05},
    "loss": {"beta": 0.1, "loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    "reference": {"source": "precomputed", "batch_size": 32},
    "train": {"learning_rate": 5e-6, "num_train_epochs": 1, "per_device_train_batch_size": 2, "max_steps": 1000,
              "gradient_accumulation_steps": 8, "eval_steps": 50, "precision": "bf16",
              "gradient_checkpointing": True, "lr_scheduler_type": "cosine_with_min_lr",
              "lr_scheduler_kwargs": {"min_lr_rate": 0.1}, "warmup_ratio": 0.1, "adam_epsilon": 1e-7,
              "optim": "adamw_torch_fused", "logging_steps": 10, "save_steps": 100, "save_total_limit": 3,
              "seed": 0},
}


def _sorted(d):
    return {k: _sorted(v) if isinstance(v, dict) else v for k, v in sorted(d.items())}


def test_a_trl_docs_yaml_translates_with_every_key_accounted_for(tmp_path, capsys):
    data = yaml.safe_load(TRL_DOCS_YAML)
    t = translate_trl(data)
    assert _sorted(t.config) == _sorted(EXPECTED)
    placed = {v.split(".")[0] for v in t.origin.values()}  # model_init_kwargs.torch_dtype -> model.dtype
    for key in data:  # mapped to one of our fields, or printed (ignored with the reason, or read)
        assert key in placed or any(note.split(": ")[1].startswith(key) or f" {key}=" in note
                                    for note in t.notes if ": " in note), key
    assert "read: eval_strategy=steps: steps: train.eval_steps" in "\n".join(t.notes)
    assert "ignored: output_dir: a run's outputs go to $DPO_HOME/runs/<run_name>/" in "\n".join(t.notes)
    assert any(n.startswith("ignored: remove_unused_columns: ") for n in t.notes)
    assert "ignored at a value that does nothing: push_to_hub=false" in t.notes
    assert "TRL defaults applied (not in the file): lora_dropout=0.05" in t.notes

    path = tmp_path / "dpo.yaml"
    path.write_text(TRL_DOCS_YAML)
    capsys.readouterr()
    cfg = load_config(path, ["train.max_steps=20"])  # recognised by itself; overrides with our names
    err = capsys.readouterr().err
    assert f"trl config: {path}: read as a TRL DPOConfig / `trl dpo` file" in err and "ignored: output_dir" in err
    assert cfg.train.max_steps == 20 and cfg.train.learning_rate == 5e-6 and cfg.peft.target_modules == "all-linear"
    assert load_config(path, trl=True) == load_config(path)
    assert from_trl(path, echo=False) == t.config


def test_every_trl_and_transformers_name_is_in_the_table():
    from transformers import TrainingArguments

    # TRL 1.16's DPOConfig (and its base), ModelConfig, ScriptArguments and DatasetMixtureConfig fields
    trl_116 = {
        "learning_rate", "model_init_kwargs", "trust_remote_code", "router_aux_loss_coef", "disable_dropout",
        "dataset_num_proc", "max_length", "truncation_mode", "padding_free", "pad_to_multiple_of",
        "precompute_ref_log_probs", "precompute_ref_batch_size", "loss_type", "loss_weights", "ld_alpha",
        "f_divergence_type", "f_alpha_divergence_coef", "label_smoothing", "beta", "use_weighting",
        "discopop_tau", "activation_offloading", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps",
        "pad_token", "logging_steps", "gradient_checkpointing", "bf16", "lr_scheduler_kwargs", "use_liger_kernel",
        "torch_empty_cache_steps", "model_name_or_path", "model_revision", "dtype", "attn_implementation",
        "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
        "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora", "load_in_8bit", "load_in_4bit",
        "bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage", "dataset_name", "dataset_config",
        "dataset_train_split", "dataset_test_split", "dataset_streaming", "ignore_bias_buffers", "datasets",
        "streaming", "test_split_size"}
    assert trl_116 <= KNOWN, sorted(trl_116 - KNOWN)
    assert {f.name for f in dataclasses.fields(TrainingArguments)} <= KNOWN
    try:  # the installed TRL, where there is one (the bench extra)
        import trl
    except ImportError:
        return
    for cls in (trl.DPOConfig, trl.ModelConfig, trl.ScriptArguments):
        assert {f.name for f in dataclasses.fields(cls)} <= KNOWN, cls


@pytest.mark.parametrize("extra, needle", [
    ({"learning_rat": 1e-5}, "learning_rat: not a name of TRL 1.16's DPOConfig"),
    ({"push_to_hub": True}, "push_to_hub=true (models are registered in MLflow"),
    ({"deepspeed": "ds_zero3.json"}, "deepspeed=ds_zero3.json (DeepSpeed is not supported"),
    ({"load_in_4bit": True}, "load_in_4bit=true (quantized (bitsandbytes) base models are not supported)"),
    ({"max_prompt_length": 512}, "max_prompt_length=512 (removed in TRL 1.x"),
    ({"eval_strategy": "epoch"}, "TRL eval_strategy=epoch is not supported here"),
    ({"optim": "lion_8bit"}, "TRL optim=lion_8bit is not supported here: the engine builds adamw_torch"),
    ({"logging_steps": 0.1}, "TRL logging_steps=0.1: a ratio of the run's steps is not supported"),
    ({"dataset_config": "default"}, "TRL dataset_config=default is not supported here"),
    ({"max_length": None}, "TRL max_length=null is not supported here"),
    ({"env": {"CUDA_VISIBLE_DEVICES": "0"}}, "env={\"CUDA_VISIBLE_DEVICES\": \"0\"} (environment variables"),
])
def test_unknown_or_unsupported_names_are_refused_by_name(extra, needle):
    with pytest.raises(ConfigError) as e:
        from_trl({"model_name_or_path": "Qwen/Qwen2-0.5B-Instruct", **extra}, echo=False)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_values_are_validated_and_errors_name_the_trl_key(tmp_path):
    with pytest.raises(ConfigError, match=r"TRL learning_rate \(our train.learning_rate\): Input should be a valid "
                                          r"number"):
        from_trl({"learning_rate": "fast"}, echo=False)
    with pytest.raises(ConfigError, match=r"TRL beta \(our loss.beta\): Input should be greater than 0"):
        from_trl({"beta": -1.0}, echo=False)
    with pytest.raises(ConfigError, match=r"loss \(from TRL loss_type, loss_weights\): loss.loss_weights has 1"):
        from_trl({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, echo=False)
    path = tmp_path / "t.yaml"
    path.write_text("beta: 0.1\nmodel_name_or_path: x\n")
    with pytest.raises(ConfigError, match=r"config error: loss.beta: Input should be greater than 0") as e:
        load_config(path, ["loss.beta=-1"])  # an override is named as ours
    assert "TRL" not in str(e.value)


def test_our_nested_form_is_never_read_as_trl(tmp_path, capsys):
    nested = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert detect_form(nested, "default.yaml") == "ours"
    assert detect_form({"run_name": "x", "train": {"learning_rate": 1e-5}}, "f") == "ours"
    assert detect_form({"run_name": "x"}, "f") == "ours"  # run_name alone decides nothing
    capsys.readouterr()
    assert load_config(ROOT / "configs" / "default.yaml").train.learning_rate == 1e-5
    assert "trl config" not in capsys.readouterr().err
    with pytest.raises(ConfigError, match="mixes our sections \\(train\\) with TRL names at the top level \\(beta\\)"):
        detect_form({"train": {"learning_rate": 1e-5}, "beta": 0.2}, "f")
    with pytest.raises(ConfigError, match="is not a TRL file"):
        load_config(ROOT / "configs" / "default.yaml", trl=True)
    path = tmp_path / "t.yaml"
    path.write_text("beta: 0.2\n")
    with pytest.raises(ConfigError, match="beta: unknown field"):  # trl=False: read as ours
        load_config(path, trl=False)


def test_trl_specifics_rpo_dtype_reference_and_local_dataset_splits(tmp_path):
    t = translate_trl({"rpo_alpha": 0.5, "dtype": "auto", "sync_ref_model": True, "ref_model_sync_steps": 64,
                       "precompute_ref_log_probs": False, "save_strategy": "no", "max_steps": 10})
    assert t.config["loss"] == {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}
    assert t.config["model"] == {"init_kwargs": {"dtype": "auto"}}  # transformers' auto: the checkpoint's dtype
    assert t.config["reference"] == {"source": "model", "sync_ref_model": True, "ref_model_sync_steps": 64}
    assert t.config["train"] == {"max_steps": 10, "save_steps": 0}
    assert translate_trl({"beta": 0.1}).config["train"] == {"num_train_epochs": 3.0}  # TRL's default epochs

    folder = tmp_path / "prefs"
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    t = translate_trl({"dataset_name": str(folder)})
    assert t.config["data"] == {"source": str(folder / "train.jsonl"), "eval_source": str(folder / "test.jsonl")}
    one = folder / "train.jsonl"
    t = translate_trl({"dataset_name": str(one)})
    assert t.config["data"] == {"source": str(one)} and any("eval_fraction" in n for n in t.notes)
    with pytest.raises(ConfigError, match="dataset_test_split=validation: .* has no 'validation' split file"):
        translate_trl({"dataset_name": str(folder), "dataset_test_split": "validation"})


def test_dpo_config_from_trl_and_show_print_loadable_yaml(tmp_path, capsys):
    from flows.cli import main

    path = tmp_path / "dpo.yaml"
    path.write_text(TRL_DOCS_YAML)
    capsys.readouterr()
    assert main(["config", "from-trl", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "trl config: ignored: output_dir" in err and "ignored" not in out
    translated = tmp_path / "ours.yaml"
    translated.write_text(out)
    assert load_config(translated) == load_config(path)  # the printed translation is the same config

    assert main(["config", "show", str(path), "--set", "loss.beta=0.3"]) == 0
    shown = capsys.readouterr().out
    assert "  # Strength of the pull towards the reference (TRL's beta)" in shown
    assert "  # Adam's epsilon (adamw_* and 8-bit optimizers)" in shown
    (tmp_path / "shown.yaml").write_text(shown)
    assert load_config(tmp_path / "shown.yaml") == load_config(path, ["loss.beta=0.3"])
    assert main(["config", "show", "--defaults"]) == 0
    (tmp_path / "defaults.yaml").write_text(capsys.readouterr().out)
    assert load_config(tmp_path / "defaults.yaml") == load_config()


def _pairs(n, offset=0):
    return "\n".join(json.dumps({"prompt": f"Say {i}.", "chosen": f" Answer: {i}", "rejected": f" no {i + 1}"})
                     for i in range(offset, offset + n)) + "\n"


def test_dpo_run_trl_config_end_to_end(dpo_home, tmp_path, capsys):
    """`dpo run --trl-config FILE --set ...` on a tiny model folder and a local dataset folder with train
    and test splits: five stages, the run's saved config is the translation plus the overrides, and the
    logged learning rates are TRL's cosine schedule."""
    from flows.cli import main
    from test_schedules import _hf_lrs

    model = tiny_model_dir(tmp_path / "tiny-model")
    data = tmp_path / "prefs"
    data.mkdir()
    (data / "train.jsonl").write_text(_pairs(16))
    (data / "test.jsonl").write_text(_pairs(4, offset=100))
    trl_file = tmp_path / "dpo.yaml"
    trl_file.write_text(f"""\
model_name_or_path:
  {model}
dataset_name:
  {data}
dataset_test_split:
  test
learning_rate:
  1.0e-3
lr_scheduler_type:
  cosine
warmup_steps:
  1
max_steps:
  3
per_device_train_batch_size:
  4
per_device_eval_batch_size:
  4
beta:
  0.1
max_length:
  128
logging_steps:
  1
save_steps:
  2
bf16:
  false
precompute_ref_log_probs:
  true
precompute_ref_batch_size:
  8
seed:
  0
run_name:
  trl-e2e
output_dir:
  tiny-DPO
report_to:
  none
""")
    capsys.readouterr()
    assert main(["run", "--trl-config", str(trl_file), "--set", "eval.num_prompts=2", "--set",
                 "eval.max_new_tokens=4", "--set", "registry.model_name=tiny-trl"]) == 0
    err = capsys.readouterr().err
    assert f"trl config: {trl_file}: read as a TRL DPOConfig" in err and "ignored: output_dir" in err
    run_dir = dpo_home / "runs" / "trl-e2e"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"].values()] == ["completed"] * 5
    saved = load_config(run_dir / "config.yaml")
    assert (saved.data.source, saved.data.eval_source) == (str(data / "train.jsonl"), str(data / "test.jsonl"))
    assert (saved.model.name_or_path, saved.train.max_steps, saved.train.precision, saved.eval.batch_size,
            saved.eval.num_prompts, saved.reference.batch_size) == (str(model), 3, "fp32", 4, 2, 8)
    history = json.loads((run_dir / "train" / "history.json").read_text())
    expected = _hf_lrs("cosine", {}, {"warmup_steps": 1}, 3, tmp_path / "hf")
    assert [h["learning_rate"] for h in history] == pytest.approx(expected, rel=1e-12, abs=0)
    assert expected[0] == 0.0 and summary["registered_model"] == "tiny-trl"
