"""Judges of generated responses, named by ``eval.judge``:

- pointwise, ``judge(prompt, response, row) -> float`` (higher is better; ``row`` holds the example's
  ``meta`` columns and ``example_id``): a Python function named ``package.module:function``, or a
  reward model folder (``reward_model:<folder>``, :class:`RewardModelJudge`);
- pairwise, ``judge(prompt, response_a, response_b, row) -> P(a better)`` in [0, 1]: the same two
  spellings behind ``pairwise:`` (``pairwise:package.module:function``,
  ``pairwise:reward_model:<folder>``: sigmoid of the score difference), :class:`PairwiseJudge`,
  called in both orders (:mod:`~dpo_engine.evaluation.pairwise`).

:func:`judge_table` judges policy and reference responses and gives the raw win-rate and the
length-controlled one (:mod:`~dpo_engine.evaluation.length_control`), each with its interval."""

from __future__ import annotations

import importlib
import inspect
import json
import math
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dpo_engine.evaluation.length_control import length_controlled
from dpo_engine.evaluation.pairwise import PairwiseFn, ScorePairwise, both_orders
from dpo_engine.evaluation.statistics import bootstrap_ci
from dpo_engine.modeling import LOAD_LOCK

Judge = Callable[[object, str, dict], float]
PAIRWISE = "pairwise:"


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


class PairwiseJudge:
    """A pairwise judge, ``eval.judge: "pairwise:..."``: ``fn(prompt, response_a, response_b, row)``
    returns P(response_a is better) in [0, 1]; anything else (NaN, 1.7, not a number) stops the
    evaluation with an error naming the judge and the example."""

    def __init__(self, fn: PairwiseFn, spec: str):
        self.fn, self.spec = fn, spec

    def __call__(self, prompt, response_a: str, response_b: str, row: dict) -> float:
        got = self.fn(prompt, response_a, response_b, row)
        try:
            p = float(got)
        except (TypeError, ValueError):
            p = math.nan
        if not 0.0 <= p <= 1.0:
            raise EvaluationError(f"eval.judge {self.spec!r} returned {got!r} for example "
                                  f"{row.get('example_id')!r}: a pairwise judge returns P(response_a "
                                  f"better), a number in [0, 1]")
        return p


def load_judge(spec: str) -> Judge | PairwiseJudge:
    """'package.module:function' -> the callable (prompt, response, row) -> float;
    'reward_model:<folder or id>' -> a :class:`RewardModelJudge`; either behind 'pairwise:' -> a
    :class:`PairwiseJudge` (a reward model's through :class:`ScorePairwise`). Raises
    EvaluationError (one line) for a spec that cannot be loaded or a function that cannot take the
    judge's arguments."""
    if spec.startswith(PAIRWISE):
        target = spec[len(PAIRWISE):]
        if target.startswith("reward_model:"):
            return PairwiseJudge(ScorePairwise(_reward_model(target)), spec)
        return PairwiseJudge(_function(target, spec, ("prompt", "response_a", "response_b", "row")), spec)
    if spec.startswith("reward_model:"):
        return _reward_model(spec)
    return _function(spec, spec, ("prompt", "response", "row"))


def _reward_model(spec: str) -> RewardModelJudge:
    target = spec.split(":", 1)[1]
    if not target:
        raise EvaluationError("eval.judge 'reward_model:' needs a folder or hub id after the colon")
    if target.startswith((".", "/", "~")) and not Path(target).expanduser().is_dir():
        raise EvaluationError(f"eval.judge reward model folder not found: {target}")
    return RewardModelJudge(str(Path(target).expanduser()) if Path(target).expanduser().is_dir() else target)


def _function(target: str, spec: str, params: tuple[str, ...]) -> Callable:
    """The callable 'package.module:function' names, checked to take ``params``."""
    mod_name, _, fn_name = target.partition(":")
    if not mod_name or not fn_name:
        form = "'pairwise:package.module:function'" if spec.startswith(PAIRWISE) else "'package.module:function'"
        raise EvaluationError(f"eval.judge {spec!r} must look like {form}")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise EvaluationError(f"eval.judge {spec!r} cannot be imported: {e}") from None
    if not callable(fn):
        raise EvaluationError(f"eval.judge {spec!r} is not callable")
    try:
        sig = inspect.signature(fn)
    except (ValueError, TypeError):  # no signature to read (some builtins): called as it is
        return fn
    try:
        sig.bind(*params)
    except TypeError as e:
        raise EvaluationError(f"eval.judge {spec!r} must take ({', '.join(params)}): {e}{_kind_hint(sig, spec)}"
                              ) from None
    return fn


def _kind_hint(sig: inspect.Signature, spec: str) -> str:
    """A hint when the function has the other kind of judge's arguments."""
    def takes(n: int) -> bool:
        try:
            sig.bind(*range(n))
            return True
        except TypeError:
            return False
    if spec.startswith(PAIRWISE) and takes(3):
        return f"; a pointwise judge is named without the prefix: {spec[len(PAIRWISE):]!r}"
    if not spec.startswith(PAIRWISE) and takes(4):
        return f"; a pairwise judge is named {PAIRWISE + spec!r}"
    return ""


def judge_table(rows: list[dict], policy_texts: list[str], ref_texts: list[str], judge: Judge | PairwiseJudge,
                *, seed: int = 0) -> tuple[pd.DataFrame, dict[str, float]]:
    """Judge both sides of every prompt: per-prompt ``win`` (pointwise: 1, 0.5 on a tie, 0, from the
    two scores; pairwise: P(policy better), both orders averaged) and the metrics: the win-rate with
    a bootstrap interval, the length-controlled win-rate with its interval, the length coefficient and
    the mean length difference (characters), and per judge kind the mean scores (pointwise) or the
    share of prompts whose two orders disagree (pairwise, ``eval/judge_disagreement``)."""
    pairwise = isinstance(judge, PairwiseJudge)
    recs = []
    for row, p_txt, r_txt in zip(rows, policy_texts, ref_texts):
        prompt = json.loads(row["prompt"])
        meta = {**json.loads(row.get("meta") or "{}"), "example_id": row["example_id"]}
        rec = {"example_id": row["example_id"], "prompt": _prompt_text(prompt),
               "policy_response": p_txt, "reference_response": r_txt}
        if pairwise:
            rec.update(both_orders(judge, prompt, p_txt, r_txt, meta))
        else:
            ps, rs = float(judge(prompt, p_txt, meta)), float(judge(prompt, r_txt, meta))
            rec.update(policy_score=ps, reference_score=rs, win=1.0 if ps > rs else 0.5 if ps == rs else 0.0)
        recs.append(rec)
    table = pd.DataFrame(recs)
    if table.empty:
        return table, {}
    wins = table["win"].to_numpy(dtype=float)
    lo, hi = bootstrap_ci(wins, seed=seed)
    p_chars, r_chars = table["policy_response"].str.len(), table["reference_response"].str.len()
    metrics = {"eval/win_rate": float(wins.mean()), "eval/win_rate_ci_low": lo, "eval/win_rate_ci_high": hi}
    if pairwise:
        metrics["eval/judge_disagreement"] = float(table["disagree"].mean())
    else:
        metrics.update({"eval/policy_score": float(table["policy_score"].mean()),
                        "eval/reference_score": float(table["reference_score"].mean())})
    metrics.update({"eval/policy_response_chars": float(p_chars.mean()),
                    "eval/reference_response_chars": float(r_chars.mean())})
    metrics.update(length_controlled(wins, p_chars.to_numpy(), r_chars.to_numpy(), seed=seed))
    return table, metrics


def win_rate_summary(m: dict[str, float]) -> str:
    """The judged metrics in one line: the mean scores (pointwise), the raw and the length-controlled
    win-rates with their 95% intervals, the length difference behind them, the order disagreement
    (pairwise)."""
    text = (f"judge score policy {m['eval/policy_score']:.2f} vs reference {m['eval/reference_score']:.2f}, "
            if "eval/policy_score" in m else "")
    text += f"win-rate {m['eval/win_rate']:.2f} [{m['eval/win_rate_ci_low']:.2f}, {m['eval/win_rate_ci_high']:.2f}]"
    if "eval/lc_win_rate" in m:
        text += (f", length-controlled {m['eval/lc_win_rate']:.2f} [{m['eval/lc_win_rate_ci_low']:.2f}, "
                 f"{m['eval/lc_win_rate_ci_high']:.2f}] (policy {m['eval/mean_length_diff']:+.0f} chars, "
                 f"length coef {m['eval/length_coef']:+.2f})")
    if "eval/judge_disagreement" in m:
        text += f", judge order disagreement {m['eval/judge_disagreement']:.2f}"
    return text


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return " | ".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)
