"""Evaluation math: held-out preference metrics, and policy-vs-reference generations scored by a judge."""

from __future__ import annotations

import importlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from data_contracts.config import EvalConfig, LossConfig
from dpo_engine.modeling import collate, pair_logps, sequence_logps
from dpo_engine.modeling import loss_from_config, pair_metrics
from dpo_engine.modeling import LOAD_LOCK, autocast, autocast_dtype, seeded

Judge = Callable[[object, str, dict], float]


class EvaluationError(ValueError):
    pass


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
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
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


@torch.inference_mode()
def preference_metrics(model: nn.Module, pairs: pd.DataFrame, ref: pd.DataFrame, *,
                       loss_cfg: LossConfig, pad_id: int, batch_size: int, chunk_size: int = 8192,
                       device: torch.device | str = "cpu", precision: str = "auto") -> dict[str, float]:
    """Loss, rewards, margins and accuracy of the policy on held-out pairs, TRL names, ``eval/``
    (under the autocast of train.precision, as training and the reference precompute)."""
    model.eval()
    amp = autocast_dtype(precision, device)
    ref_map = ref.set_index("example_id")
    records = pairs.to_dict("records")
    pcs, prs, inputs, ld = [], [], {}, False
    for b0 in range(0, len(records), batch_size):
        with autocast(amp, device):
            fw = pair_logps(model, records[b0:b0 + batch_size], pad_id, loss_cfg=loss_cfg,
                            chunk_size=chunk_size, device=device)
        pcs.append(fw["chosen"].double().cpu())
        prs.append(fw["rejected"].double().cpu())
        for k, v in fw["loss_inputs"].items():
            inputs.setdefault(k, []).append(v.double().cpu() if v.is_floating_point() else v.cpu())
        ld = fw["ld_weighted"]
    pc, pr = torch.cat(pcs), torch.cat(prs)
    rc = torch.tensor(ref_map.loc[pairs["example_id"], "ref_chosen_logps"].to_numpy())
    rr = torch.tensor(ref_map.loc[pairs["example_id"], "ref_rejected_logps"].to_numpy())
    out = loss_from_config(loss_cfg, pc, pr, rc, rr, ld_weighted=ld,
                           **{k: torch.cat(v) for k, v in inputs.items()})
    return pair_metrics(out, pc, pr, prefix="eval/")


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompts: list[list[int]], cfg: EvalConfig,
             device: torch.device | str = "cpu",
             progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Batched left-padded generation; returns the new token ids of each prompt (EOS stripped)."""
    model.eval()
    pad = tokenizer.pad_token_id
    outs: list[list[int]] = []
    for b0 in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[b0:b0 + cfg.batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
        att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with seeded(cfg.seed + b0) if cfg.do_sample else nullcontext():  # greedy draws nothing
            gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=cfg.max_new_tokens,
                                 do_sample=cfg.do_sample, temperature=cfg.temperature if cfg.do_sample else None,
                                 top_p=cfg.top_p if cfg.do_sample else None, top_k=None,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for row in gen[:, width:].tolist():
            # generation stops at EOS and pads what follows: cut at the first EOS; a pad token before
            # it was generated (not filler) and stays
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            outs.append(row)
        if progress:
            progress(len(chunk))
    return outs


@torch.inference_mode()
def sample_kl(policy: nn.Module, reference: nn.Module, prompts: list[list[int]],
              samples: list[list[int]], *, eos_id: int, pad_id: int, batch_size: int,
              max_new_tokens: int | None = None, device: torch.device | str = "cpu") -> np.ndarray:
    """Per-sequence log pi(y|x) - log ref(y|x) on ``samples`` (as :func:`generate` returns them:
    EOS stripped); their mean is a Monte-Carlo estimate of KL(policy || reference), unbiased when
    the samples are drawn from pi itself (temperature 1, top_p 1: see :func:`kl_sampling`). A sample
    shorter than ``max_new_tokens`` ended with EOS, which is scored; one cut at the limit is scored
    without it (its probability is that of the prefix)."""
    diffs = []
    for b0 in range(0, len(prompts), batch_size):
        ps = prompts[b0:b0 + batch_size]
        cs = [list(s) + ([] if max_new_tokens is not None and len(s) >= max_new_tokens else [eos_id])
              for s in samples[b0:b0 + batch_size]]
        batch = collate(ps, cs, pad_id).to(device)
        lp = sequence_logps(policy, batch)["logps"]
        lr = sequence_logps(reference, batch)["logps"]
        diffs.append((lp - lr).double().cpu())
    return torch.cat(diffs).numpy() if diffs else np.zeros(0)


def kl_sampling(cfg: EvalConfig) -> EvalConfig | None:
    """The sampling settings of a KL estimate: None when ``cfg``'s own generations are draws from
    the policy's distribution (do_sample, temperature 1, top_p 1) and can be reused; else the same
    settings with pure sampling (greedy or tempered outputs would bias the estimate)."""
    if cfg.do_sample and cfg.temperature == 1.0 and cfg.top_p == 1.0:
        return None
    return cfg.model_copy(update={"do_sample": True, "temperature": 1.0, "top_p": 1.0})


def kl_metrics(diffs: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """The KL estimate with its 95% bootstrap interval."""
    lo, hi = bootstrap_ci(diffs, seed=seed)
    mean = float(diffs.mean()) if len(diffs) else float("nan")
    return {"eval/kl_policy_reference": mean, "eval/kl_policy_reference_ci_low": lo,
            "eval/kl_policy_reference_ci_high": hi}


def length_metrics(name: str, ids: list[list[int]], max_new_tokens: int) -> dict[str, float]:
    """Response length statistics in tokens: mean, median, max and the share cut at max_new_tokens."""
    n = np.array([len(x) for x in ids], dtype=float)
    if not len(n):
        return {}
    return {f"eval/{name}_response_tokens": float(n.mean()),
            f"eval/{name}_response_tokens_median": float(np.median(n)),
            f"eval/{name}_response_tokens_max": float(n.max()),
            f"eval/{name}_response_truncated": float((n >= max_new_tokens).mean())}


def bootstrap_ci(values: np.ndarray, *, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


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
