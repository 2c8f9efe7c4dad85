"""Judges of generated responses. A judge is a callable ``judge(prompt, response, row) -> float``
(higher is better; ``row`` holds the example's ``meta`` columns and ``example_id``): a Python function
named ``package.module:function``, or a reward model folder (:class:`RewardModelJudge`).
:func:`judge_table` scores policy and reference responses and gives the win-rate."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dpo_engine.evaluation.statistics import bootstrap_ci
from dpo_engine.modeling import LOAD_LOCK

Judge = Callable[[object, str, dict], float]


class EvaluationError(ValueError):
    """A judge that cannot be loaded or called as configured (``eval.judge``)."""


class RewardModelJudge:
    """A reward model as judge: ``eval.judge: "reward_model:<folder or hub id>"``.

    An ``AutoModelForSequenceClassification`` scores the prompt followed by the response (rendered
    with the reward model tokenizer's chat template when it has one); the score is its single logit,
    or the log-odds of the last label for a multi-label head. Higher is better; any scale works,
    since the win-rate only compares policy and reference scores of the same prompt. Loaded on first
    use, safetensors only, ``trust_remote_code`` off.
    """

    def __init__(self, name_or_path: str, max_length: int = 2048):
        self.name_or_path, self.max_length = name_or_path, max_length
        self._model = self._tok = None

    def _load(self):
        try:
            self._tok = AutoTokenizer.from_pretrained(self.name_or_path)
            with LOAD_LOCK:
                self._model = AutoModelForSequenceClassification.from_pretrained(
                    self.name_or_path, use_safetensors=True, trust_remote_code=False).eval()
        except (OSError, ValueError) as e:
            raise EvaluationError(f"eval.judge reward model {self.name_or_path!r} cannot be loaded: "
                                  f"{str(e).splitlines()[0]}") from None

    def render(self, prompt, response: str) -> str:
        if isinstance(prompt, list) and getattr(self._tok, "chat_template", None):
            return self._tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                                 tokenize=False)
        if isinstance(prompt, list):
            prompt = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt) + "\nassistant: "
        return f"{prompt}{response}"

    @torch.inference_mode()
    def __call__(self, prompt, response: str, row: dict) -> float:
        if self._model is None:
            self._load()
        enc = self._tok(self.render(prompt, response), return_tensors="pt", truncation=True,
                        max_length=self.max_length)
        logits = self._model(**enc).logits[0].float()
        if logits.numel() == 1:
            return float(logits[0])
        logp = torch.log_softmax(logits, dim=-1)
        return float(logp[-1] - torch.log1p(-logp[-1].exp().clamp(max=1 - 1e-7)))


def load_judge(spec: str) -> Judge:
    """'package.module:function' -> the callable (prompt, response, row) -> float;
    'reward_model:<folder or id>' -> a :class:`RewardModelJudge`. Other judges implement the same
    call: ``judge(prompt, response, row) -> float`` (higher is better; ``row`` holds the example's
    ``meta`` columns and ``example_id``)."""
    if spec.startswith("reward_model:"):
        target = spec.split(":", 1)[1]
        if not target:
            raise EvaluationError("eval.judge 'reward_model:' needs a folder or hub id after the colon")
        if target.startswith((".", "/", "~")) and not Path(target).expanduser().is_dir():
            raise EvaluationError(f"eval.judge reward model folder not found: {target}")
        return RewardModelJudge(str(Path(target).expanduser()) if Path(target).expanduser().is_dir()
                                else target)
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise EvaluationError(f"eval.judge {spec!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise EvaluationError(f"eval.judge {spec!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise EvaluationError(f"eval.judge {spec!r} is not callable")
    return fn


def judge_table(rows: list[dict], policy_texts: list[str], ref_texts: list[str], judge: Judge
                ) -> tuple[pd.DataFrame, dict[str, float]]:
    """Score both sides, per-prompt wins (ties count half), win-rate with a bootstrap interval."""
    recs = []
    for row, p_txt, r_txt in zip(rows, policy_texts, ref_texts):
        prompt = json.loads(row["prompt"])
        meta = {**json.loads(row.get("meta") or "{}"), "example_id": row["example_id"]}
        ps, rs = float(judge(prompt, p_txt, meta)), float(judge(prompt, r_txt, meta))
        recs.append({"example_id": row["example_id"], "prompt": _prompt_text(prompt),
                     "policy_response": p_txt, "reference_response": r_txt,
                     "policy_score": ps, "reference_score": rs,
                     "win": 1.0 if ps > rs else 0.5 if ps == rs else 0.0})
    table = pd.DataFrame(recs)
    if table.empty:
        return table, {}
    wins = table["win"].to_numpy()
    lo, hi = bootstrap_ci(wins)
    metrics = {
        "eval/win_rate": float(wins.mean()), "eval/win_rate_ci_low": lo, "eval/win_rate_ci_high": hi,
        "eval/policy_score": float(table["policy_score"].mean()),
        "eval/reference_score": float(table["reference_score"].mean()),
        "eval/policy_response_chars": float(table["policy_response"].str.len().mean()),
        "eval/reference_response_chars": float(table["reference_response"].str.len().mean()),
    }
    return table, metrics


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return " | ".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)
