"""A registered model with a chat template answers like the chat model it is: ``mlflow.pyfunc`` replies
exactly what ``model.generate`` replies through ``tokenizer.apply_chat_template(...,
add_generation_prompt=True)`` (greedy, new tokens decoded with special tokens skipped), for a full
model and for a base + adapter version, to plain strings (one user turn each), conversations and
MLflow chat requests. A model whose tokenizer has no chat template stays MLflow's text-generation.
Tiny Llamas built here (weights spread wide enough that replies depend on the prompt), a tmp SQLite store."""

from __future__ import annotations

import pytest

from tiny import tiny_tokenizer

torch = pytest.importorskip("torch")
pytest.importorskip("mlflow")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from dpo_engine import tracking as registry  # noqa: E402

PROMPTS = ["Hi", "What is 2 + 2?"]
CONVERSATION = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "2+2?"}]
N = 12  # max_new_tokens


def _model_dir(path, chat_template: bool = True):
    """A tiny Llama (initializer_range 0.5: its greedy replies vary with the prompt and can end the
    turn with <|im_end|>) and the character tokenizer of tests/tiny.py, ChatML template or none."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    if not chat_template:
        tok.chat_template = None
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None, initializer_range=0.5)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _generate(model, tok, messages, n=N):
    """(reply, prompt token count, new token count, whether it ended the turn): the reference every
    served reply must equal."""
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        new = model.generate(**enc, max_new_tokens=n, do_sample=False)[0, enc["input_ids"].shape[1]:]
    return (tok.decode(new, skip_special_tokens=True), enc["input_ids"].shape[1], len(new),
            int(new[-1]) == tok.eos_token_id)


def _raw_continuation(model, tok, prompt, n=N):
    """What the text-generation pipeline generated: the prompt without the chat template."""
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return tok.decode(model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:],
                          skip_special_tokens=True)


def _user(text):
    return [{"role": "user", "content": text}]


def _check_served(uri, model, tok):
    """The pyfunc at ``uri`` replies as ``model`` does through the chat template, in every input shape."""
    served = mlflow.pyfunc.load_model(uri)
    want = [_generate(model, tok, _user(p))[0] for p in PROMPTS]
    assert len(set(want)) == 2 and all(want)  # replies depend on the prompt: the comparison means something
    # the README's call: plain strings, each one user turn
    assert served.predict(PROMPTS, params={"max_new_tokens": N}) == want
    assert served.predict(PROMPTS[0], params={"max_new_tokens": N}) == want[:1]
    assert want != [_raw_continuation(model, tok, p) for p in PROMPTS]  # not the template-less prompt
    # messages: one conversation, a batch of them, a one-column DataFrame of them
    conv = _generate(model, tok, CONVERSATION)[0]
    assert served.predict(CONVERSATION, params={"max_new_tokens": N}) == [conv]
    assert served.predict([CONVERSATION, _user(PROMPTS[1])], params={"max_new_tokens": N}) == [conv, want[1]]
    assert served.predict(pd.Series([_user(PROMPTS[0])]), params={"max_new_tokens": N}) == want[:1]
    # MLflow's chat task request (OpenAI's spelling) -> chat.completion, as served from a JSON payload
    text, n_prompt, n_new, ended = _generate(model, tok, CONVERSATION, n=5)
    [resp] = served.predict({"messages": CONVERSATION, "max_tokens": 5})
    assert resp["object"] == "chat.completion" and resp["choices"][0]["message"] == {"role": "assistant",
                                                                                    "content": text}
    assert resp["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_new,
                             "total_tokens": n_prompt + n_new}
    assert resp["choices"][0]["finish_reason"] == ("stop" if ended else "length")
    rows = served.predict(pd.DataFrame({"messages": [_user(p) for p in PROMPTS], "max_tokens": [N, N]}))
    assert [r["choices"][0]["message"]["content"] for r in rows] == want
    return served, want


def test_full_model_is_registered_and_served_as_a_chat_model(mlflow_store, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _model_dir(tmp_path / "policy")
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    rid = registry.start_run("chat-test", "full")
    out = registry.register_model(rid, folder, "tiny-chat", metrics={}, gate_thresholds={})
    client = MlflowClient()
    tags = client.get_model_version("tiny-chat", str(out["version"])).tags
    assert tags["task"] == "llm/v1/chat" and tags["chat_template"] == "true" and tags["model_format"] == "full"
    info = mlflow.models.get_model_info("models:/tiny-chat@champion")
    assert info.metadata["task"] == "llm/v1/chat"
    assert info.flavors["transformers"]["inference_task"] == "llm/v1/chat"
    assert info.flavors["python_function"]["loader_module"] == "dpo_chat_model"
    assert [p.name for p in info.signature.params.params] == ["max_new_tokens", "do_sample", "temperature", "top_p"]

    served, want = _check_served("models:/tiny-chat@champion", model, tok)
    # as `mlflow models serve` serves it: an OpenAI-style chat body, and MLflow's {"inputs", "params"}
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    http = TestClient(scoring_server.init(served))
    r = http.post("/invocations", json={"messages": _user(PROMPTS[1]), "max_tokens": N})
    assert r.status_code == 200 and r.json()[0]["choices"][0]["message"]["content"] == want[1]
    assert http.post("/invocations", json={"inputs": PROMPTS, "params": {"max_new_tokens": N}}).json() == \
        {"predictions": want}
    # the reply is cut before a stop sequence, which is not part of it
    stop = want[0][1]
    [resp] = served.predict({"messages": _user(PROMPTS[0]), "stop": [stop], "max_tokens": N})
    assert resp["choices"][0] == {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": want[0][:want[0].index(stop)]}}
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"chat request keys \['frequency_penalty'\]"):
        served.predict({"messages": _user("Hi"), "frequency_penalty": 0.5})
    with pytest.raises(mlflow.exceptions.MlflowException, match="n must be 1"):
        served.predict({"messages": _user("Hi"), "n": 2})
    with pytest.raises(mlflow.exceptions.MlflowException, match="each input must be a string"):
        served.predict([3])

    # the weights-only loader and MLflow's transformers loader read the same version as before
    loaded, loaded_tok = registry.load_registered("models:/tiny-chat@champion")
    assert loaded_tok.chat_template == tok.chat_template
    assert _generate(loaded, loaded_tok, _user(PROMPTS[1]))[0] == want[1]
    pipe = mlflow.transformers.load_model("models:/tiny-chat@champion")
    assert type(pipe).__name__ == "TextGenerationPipeline"
    dl = registry.download_hf_folder("models:/tiny-chat@champion", tmp_path / "dl")
    assert {"config.json", "model.safetensors", "chat_template.jinja"} <= {p.name for p in dl.iterdir()}
    assert not (dl / "dpo_chat_model.py").exists()  # the pyfunc's code is not part of the weights folder

    # registering the run again: the same version, nothing logged
    again = registry.register_model(rid, folder, "tiny-chat", metrics={}, gate_thresholds={})
    assert again["version"] == out["version"] and len(client.search_model_versions("name = 'tiny-chat'")) == 1


def test_adapter_version_is_served_as_a_chat_model(mlflow_store, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_contracts.config import PeftConfig
    from dpo_engine.modeling import apply_adapter, export_model

    pytest.importorskip("peft")
    base = _model_dir(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    # random lora_B: the adapter changes the replies (a fresh LoRA starts as the identity)
    policy = apply_adapter(AutoModelForCausalLM.from_pretrained(base),
                           PeftConfig(enabled=True, r=4, lora_alpha=16, extra={"init_lora_weights": False}))
    folder = export_model(policy, tok, tmp_path / "train" / "model", "adapter", base_model_path=str(base))
    policy.eval()
    rid = registry.start_run("chat-test", "adapter")
    out = registry.register_model(rid, folder, "tiny-chat-adapter", metrics={}, gate_thresholds={})
    tags = MlflowClient().get_model_version("tiny-chat-adapter", str(out["version"])).tags
    assert tags["task"] == "llm/v1/chat" and tags["model_format"] == "adapter"
    assert mlflow.models.get_model_info("models:/tiny-chat-adapter/1").flavors["transformers"]["peft_adaptor"] == "peft"

    _, want = _check_served("models:/tiny-chat-adapter@champion", policy, tok)
    with policy.disable_adapter():
        assert [_generate(policy, tok, _user(p))[0] for p in PROMPTS] != want  # the adapter is applied


def test_model_without_chat_template_stays_text_generation(mlflow_store, tmp_path):
    folder = _model_dir(tmp_path / "plain", chat_template=False)
    rid = registry.start_run("chat-test", "plain")
    out = registry.register_model(rid, folder, "tiny-plain", metrics={}, gate_thresholds={})
    tags = MlflowClient().get_model_version("tiny-plain", str(out["version"])).tags
    assert tags["task"] == "text-generation" and tags["chat_template"] == "false"
    info = mlflow.models.get_model_info("models:/tiny-plain/1")
    assert info.flavors["python_function"]["loader_module"] == "mlflow.transformers"
    assert "inference_task" not in info.flavors["transformers"]
    [text] = mlflow.pyfunc.load_model("models:/tiny-plain/1").predict(["Hi"], params={"max_new_tokens": 4})
    assert isinstance(text, str) and text.startswith("Hi")  # MLflow's text-generation: prompt + continuation
