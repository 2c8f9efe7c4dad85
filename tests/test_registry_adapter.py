"""Registering a PEFT adapter export (peft.export: adapter): logged as base + adapter, loadable through
``models:/NAME@champion`` by MLflow (pyfunc) and by registry.load_registered / download_hf_folder,
without the base folder it was trained on (a tiny Llama built here; a tmp SQLite store)."""

from __future__ import annotations

import json
import shutil

import pytest

from tiny import CHATML, tiny_model_dir

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("mlflow")

from data_contracts.config import ModelConfig, PeftConfig  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from dpo_engine import tracking as registry  # noqa: E402
from dpo_engine.modeling import apply_adapter, export_model  # noqa: E402
from dpo_engine.modeling import load_model  # noqa: E402

NAME = "tiny-adapter"
PROMPT = "Hi"


def _adapter(tmp_path):
    """(base folder, adapter-only folder as the train stage exports it, the PeftModel in memory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_model_dir(tmp_path / "base", hidden=16)
    tok = AutoTokenizer.from_pretrained(base)
    # random lora_B: the adapter changes the outputs (a fresh LoRA starts as the identity)
    policy = apply_adapter(AutoModelForCausalLM.from_pretrained(base),
                           PeftConfig(enabled=True, r=4, lora_alpha=8, extra={"init_lora_weights": False}))
    folder = export_model(policy, tok, tmp_path / "train" / "model", "adapter", base_model_path=str(base))
    return base, folder, policy.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_adapter_export_registers_as_base_plus_adapter_and_generates(mlflow_store, tmp_path):
    import mlflow
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, folder, policy = _adapter(tmp_path)
    assert (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists()
    assert registry.model_format(folder) == "adapter" and registry.adapter_base(folder) == (str(base), None)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    expected = _logits(policy, ids)
    # the reply to PROMPT as one user turn, through the chat template (greedy, special tokens skipped)
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)

    def reply():
        return tok.decode(policy.generate(**chat, max_new_tokens=6, do_sample=False)[0, chat["input_ids"].shape[1]:],
                          skip_special_tokens=True)

    with policy.disable_adapter():
        assert not torch.allclose(_logits(policy, ids), expected)  # the adapter matters
        base_text = reply()
    text = reply()

    rid = registry.start_run("adapter-test", "r1")
    out = registry.register_model(rid, folder, NAME, metrics={"eval/win_rate": 0.7},
                                  gate_thresholds={"eval/win_rate": 0.5},
                                  tags={"base_model": "builtin:tiny", "config_hash": "abc"})
    assert out["version"] == 1 and out["aliases"] == ["challenger", "champion"] and out["gate_passed"]
    client = MlflowClient()
    tags = client.get_model_version(NAME, "1").tags
    assert tags["model_format"] == "adapter" and tags["adapter_peft_type"] == "LORA"
    assert tags["adapter_base_model"] == str(base) and tags["base_model"] == "builtin:tiny"
    assert tags["config_hash"] == "abc" and tags["run_id"] == rid
    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert info.flavors["transformers"]["peft_adaptor"] == "peft"

    # the version is self-contained: the base folder is only read while registering
    shutil.rmtree(base)

    # registering the run again: the same version, nothing logged (the base is gone: it could not be)
    again = registry.register_model(rid, folder, NAME, metrics={"eval/win_rate": 0.7},
                                    gate_thresholds={"eval/win_rate": 0.5})
    assert again["version"] == 1 and len(client.search_model_versions(f"name = '{NAME}'")) == 1

    # MLflow's pyfunc replies with base + adapter (greedy: the same reply as the trained PeftModel)
    assert tags["task"] == "llm/v1/chat" and info.metadata["task"] == "llm/v1/chat"
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    pred = pyfunc.predict([PROMPT], params={"max_new_tokens": 6, "do_sample": False})
    assert pred == [text] and text != base_text

    # load_registered: a PeftModel with the trained outputs and the chat template; merge=True: plain
    model, tokenizer = registry.load_registered(f"models:/{NAME}@champion")
    assert isinstance(model, PeftModel) and tokenizer.chat_template == CHATML
    assert torch.equal(_logits(model, ids), expected)
    merged, _ = registry.load_registered(f"models:/{NAME}/1", merge=True)
    assert not isinstance(merged, PeftModel)
    assert torch.allclose(_logits(merged, ids), expected, atol=1e-5)

    # download_hf_folder: an adapter folder over dst/base, loaded by the pipeline's own loader
    dl = registry.download_hf_folder(f"models:/{NAME}@champion", tmp_path / "dl")
    assert json.loads((dl / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((dl / "base").resolve())
    assert (dl / "adapter_model.safetensors").is_file() and (dl / "chat_template.jinja").is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (dl / "base").iterdir()}
    assert torch.equal(_logits(load_model(ModelConfig(), str(dl)), ids), expected)
    plain = registry.download_hf_folder(f"models:/{NAME}/1", tmp_path / "plain", merge=True)
    assert (plain / "config.json").is_file() and not (plain / "adapter_config.json").exists()
    assert (plain / "chat_template.jinja").is_file()
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(plain), ids), expected, atol=1e-5)


def test_unregistrable_folders_fail_before_anything_is_logged(mlflow_store, tmp_path):
    base, folder, _ = _adapter(tmp_path)
    rid = registry.start_run("adapter-errors", "r1")
    kw = dict(metrics={}, gate_thresholds={})

    moved = base.rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=f"base model folder {base} of adapter"):
        registry.register_model(rid, folder, NAME, **kw)
    moved.rename(base)

    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        registry.register_model(rid, folder, NAME, **kw)
    with pytest.raises(FileNotFoundError, match="neither a Hugging Face model folder"):
        registry.register_model(rid, tmp_path, NAME, **kw)

    client = MlflowClient()
    assert client.search_model_versions(f"run_id = '{rid}'") == []
    assert client.search_logged_models([client.get_run(rid).info.experiment_id]) == []
