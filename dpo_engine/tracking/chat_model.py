"""The MLflow pyfunc of a registered chat model: messages in, the tokenizer's chat template applied,
the reply out.

A model whose tokenizer has a chat template is logged (``packaging``) as MLflow's transformers flavor
with MLflow's chat task (``llm/v1/chat``) in MLflow's own layout (``model/``, ``components/tokenizer/``,
``peft/`` for base + adapter), so ``mlflow.transformers.load_model`` and the weights-only
``load_registered`` read it as before; its ``python_function`` flavor loads through this file, which
the version carries as ``code/dpo_chat_model.py``: a loading machine needs mlflow, transformers and
torch (peft for an adapter), not this project. MLflow's own chat pyfunc takes no plain strings, has
no params schema (``params={"max_new_tokens": 16}`` would be ignored) and samples by default.

``predict`` takes
- a string or a list of strings, each one user turn, or a conversation (a list of ``{"role",
  "content"}`` messages) or a list of them: returns one reply string per input;
- a chat request as MLflow's chat task takes it (OpenAI's): a dict ``{"messages": [...], "max_tokens",
  "temperature", "top_p", "top_k", "stop", "tools"}``, a list of them, or a DataFrame with a
  ``messages`` column (one request per row): returns MLflow's chat response per request, a
  ``chat.completion`` dict (``choices[0]["message"]["content"]``, ``finish_reason``, ``usage``).

Each conversation is rendered with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``
and generated on its own (no padding), and the new tokens are decoded with special tokens skipped.
Params: ``max_new_tokens`` (64), ``do_sample`` (false: greedy), ``temperature``, ``top_p``; a chat
request's own keys override them (``max_tokens``; ``temperature`` 0 is greedy, above 0 samples).
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from pathlib import Path

DEFAULTS = {"max_new_tokens": 64, "do_sample": False, "temperature": 1.0, "top_p": 1.0}
REQUEST_KEYS = ("messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "tools", "n", "stream")


def _error(message: str):
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def _load_lock():
    """The project's model-loading lock when it is importable (from_pretrained swaps process-wide
    globals while it runs), else none: this file also runs where the project is not installed."""
    try:
        from dpo_engine.modeling import LOAD_LOCK
    except ImportError:
        return contextlib.nullcontext()
    return LOAD_LOCK


def _given(value) -> bool:
    """A request field that is set (a DataFrame holds the missing ones as None or NaN)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _is_message(item) -> bool:
    return isinstance(item, dict) and "role" in item


def _conversation(item) -> list[dict]:
    if isinstance(item, str):
        return [{"role": "user", "content": item}]
    if hasattr(item, "tolist"):  # a DataFrame cell of messages
        item = item.tolist()
    if isinstance(item, (list, tuple)) and item and all(_is_message(m) for m in item):
        return [dict(m) for m in item]
    raise _error("each input must be a string (one user turn), a list of chat messages "
                 f"({{'role': ..., 'content': ...}}) or a chat request with 'messages'; got {type(item).__name__}")


class ChatModel:
    """Replies of the registered weights to chat messages (see the module docstring)."""

    def __init__(self, path: str):
        import mlflow.transformers
        from mlflow.models import Model

        with _load_lock():
            parts = mlflow.transformers.load_model(str(path), return_type="components")
        self.model, self.tokenizer = parts["model"].eval(), parts["tokenizer"]
        flavor = Model.load(str(Path(path) / "MLmodel")).flavors.get("transformers", {})
        self.name = str(flavor.get("source_model_name", ""))

    def predict(self, data, params: dict | None = None):
        import pandas as pd

        params = {**DEFAULTS, **(params or {})}
        if isinstance(data, pd.DataFrame):
            if "messages" in data.columns:
                return [self._respond(row, params) for row in data.to_dict("records")]
            if data.shape[1] != 1:
                raise _error(f"a DataFrame input needs a 'messages' column or exactly one column of "
                             f"prompts; got columns {list(data.columns)}")
            data = data.iloc[:, 0]
        if isinstance(data, dict):
            if "messages" not in data:
                raise _error(f"a chat request needs 'messages'; got keys {sorted(data)}")
            return [self._respond(data, params)]
        if hasattr(data, "tolist"):  # Series, numpy array
            data = data.tolist()
        if isinstance(data, str) or (isinstance(data, list) and data and all(_is_message(m) for m in data)):
            data = [data]  # one prompt, or one conversation
        if not isinstance(data, list):
            raise _error(f"unsupported input type {type(data).__name__}: give a string, a list of strings, "
                         "chat messages or a chat request with 'messages'")
        return [self._respond(x, params) if isinstance(x, dict) and "messages" in x
                else self._reply(_conversation(x), params)[0] for x in data]

    def _respond(self, request: dict, params: dict) -> dict:
        """One chat request (MLflow's chat task input) -> MLflow's chat.completion response."""
        request = {k: v for k, v in request.items() if _given(v)}
        if unknown := sorted(set(request) - set(REQUEST_KEYS)):
            raise _error(f"chat request keys {unknown} are not supported (supported: {list(REQUEST_KEYS)})")
        if request.get("n", 1) != 1 or request.get("stream"):
            raise _error("a chat request generates one whole reply: n must be 1 and stream false")
        gen = dict(params)
        if "max_tokens" in request:
            gen["max_new_tokens"] = request["max_tokens"]
        if "temperature" in request:  # OpenAI's meaning: 0 is greedy
            gen["do_sample"] = float(request["temperature"]) > 0
            gen["temperature"] = float(request["temperature"]) or 1.0
        for key in ("top_p", "top_k"):
            if key in request:
                gen[key] = request[key]
        stop = request.get("stop")
        stop = [stop] if isinstance(stop, str) else list(stop) if stop is not None else None
        tools = request.get("tools")
        text, finish, n_prompt, n_new = self._reply(_conversation(request["messages"]), gen, stop,
                                                    list(tools) if tools is not None else None)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.name,
                "choices": [{"index": 0, "finish_reason": finish,
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}}

    def _reply(self, messages: list[dict], gen: dict, stop: list[str] | None = None,
               tools: list | None = None) -> tuple[str, str, int, int]:
        """(reply text, finish reason, prompt tokens, new tokens) for one conversation."""
        import torch

        tok = self.tokenizer
        enc = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        sample = bool(gen["do_sample"])
        kw = {"max_new_tokens": int(gen["max_new_tokens"]), "do_sample": sample,
              # greedy: the sampling settings of the model's generation_config do not apply
              "temperature": float(gen["temperature"]) if sample else None,
              "top_p": float(gen["top_p"]) if sample else None,
              "top_k": int(gen["top_k"]) if sample and gen.get("top_k") is not None else None}
        if tok.pad_token_id is not None:
            kw["pad_token_id"] = tok.pad_token_id
        if stop:
            kw.update(stop_strings=stop, tokenizer=tok)
        with torch.inference_mode():
            new = self.model.generate(**enc, **kw)[0, enc["input_ids"].shape[1]:]
        text = tok.decode(new, skip_special_tokens=True)
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tok.eos_token_id}
        finish = "stop" if len(new) and int(new[-1]) in eos else "length"
        for s in stop or ():
            if s in text:
                text, finish = text[:text.index(s)], "stop"  # the stop sequence is not part of the reply
        return text, finish, int(enc["input_ids"].shape[1]), int(len(new))


def _load_pyfunc(path, model_config=None):
    """MLflow's pyfunc loader entry point (``loader_module`` of the version's python_function flavor)."""
    if model_config:
        raise _error(f"this chat model takes no model_config (got {sorted(model_config)}); pass "
                     "generation settings as predict params")
    return ChatModel(path)
