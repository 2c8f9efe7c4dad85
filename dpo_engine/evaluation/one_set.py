"""One evaluation set, policy against reference: its preference metrics, the generations of both models
on its first prompts, their lengths, KL(policy || reference) and the judge's win-rates. The evaluate
stage calls :func:`evaluate_set` for the default held-out split and for each named set (``eval.sets``)
with the same :class:`Models`, so the policy and the reference are loaded once for all of them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd
from tqdm.auto import tqdm

from data_contracts.config import RunConfig
from data_contracts.config.evaluation import EvalConfig
from data_contracts.images import row_refs
from dpo_engine.evaluation.generation import generate, kl_sampling, sample_kl
from dpo_engine.evaluation.judges import judge_table
from dpo_engine.evaluation.preference import preference_metrics
from dpo_engine.evaluation.statistics import kl_metrics, length_metrics

DEFAULT_PREFIX = "eval/"  # the metrics of the default held-out split; every function here names them so


@dataclass
class EvalSet:
    """What one set is evaluated on and how."""

    name: str  # "eval": the default held-out split; else the eval.sets name
    prefix: str  # its metrics' prefix: "eval/" or the set's
    pairs: pd.DataFrame  # valid.parquet rows
    ref: pd.DataFrame  # their reference log-probs (the precompute cache)
    judge: Any  # a loaded judge (dpo_engine.evaluation.load_judge), or None
    num_prompts: int  # prompts generated on (the first ones)
    gen: EvalConfig  # generation settings (the set's max_new_tokens)


class Models:
    """The policy, and the reference loaded on first use and then kept for every set (and the
    benchmarks) until :meth:`release`."""

    def __init__(self, cfg: RunConfig, policy, tok, device, vision, load_reference: Callable[[], Any]):
        self.cfg, self.policy, self.tok, self.device, self.vision = cfg, policy, tok, device, vision
        self._load_reference, self._reference = load_reference, None

    def reference(self):
        if self._reference is None:
            self._reference = self._load_reference()
        return self._reference

    def release(self) -> None:
        self.policy = self._reference = None


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """``metrics`` named ``eval/...`` renamed ``<prefix>...`` (the default prefix: unchanged)."""
    if prefix == DEFAULT_PREFIX:
        return dict(metrics)
    return {prefix + k.removeprefix(DEFAULT_PREFIX): v for k, v in metrics.items()}


def evaluate_set(s: EvalSet, models: Models) -> tuple[dict[str, float], pd.DataFrame]:
    """(metrics named ``eval/...``, the samples table: prompts, both responses and the judge's
    verdicts) of set ``s``; :func:`prefixed` gives them the set's prefix."""
    cfg, tok, device, policy, vision = models.cfg, models.tok, models.device, models.policy, models.vision
    metrics = preference_metrics(policy, s.pairs, s.ref, loss_cfg=cfg.loss, pad_id=tok.pad_token_id,
                                 batch_size=s.gen.batch_size, chunk_size=cfg.train.logit_chunk_size,
                                 device=device, precision=cfg.train.precision, vision=vision)
    rows = s.pairs.head(s.num_prompts).to_dict("records")
    if not rows:
        return metrics, pd.DataFrame()
    # the model the policy was compared with in training: reference.model_path when set
    reference = models.reference()
    prompts = [list(r["prompt_input_ids"]) for r in rows]
    images = {"images": [row_refs(r) for r in rows], "vision": vision}  # generation sees the images
    texts, generated = {}, {}
    what = "" if s.name == "eval" else f" ({s.name})"
    for side, model in (("policy", policy), ("reference", reference)):
        with tqdm(total=len(prompts), desc=f"generate {side}{what}", unit="prompt") as bar:
            generated[side] = generate(model, tok, prompts, s.gen, device=device, progress=bar.update, **images)
        texts[side] = [tok.decode(x, skip_special_tokens=True) for x in generated[side]]
        metrics.update(length_metrics(side, generated[side], s.gen.max_new_tokens))
    # KL(policy || reference) on draws from the policy itself: its generations when they are
    # pure samples, else a separate sample at temperature 1 (greedy outputs would bias it)
    kl_cfg = kl_sampling(s.gen)
    samples = generated["policy"]
    if kl_cfg is not None:
        with tqdm(total=len(prompts), desc=f"sample policy (KL){what}", unit="prompt") as bar:
            samples = generate(policy, tok, prompts, kl_cfg, device=device, progress=bar.update, **images)
    metrics.update(kl_metrics(sample_kl(policy, reference, prompts, samples, eos_id=tok.eos_token_id,
                                        pad_id=tok.pad_token_id, batch_size=s.gen.batch_size,
                                        max_new_tokens=s.gen.max_new_tokens, device=device, **images),
                              seed=s.gen.seed))
    if s.judge is not None:
        table, judged = judge_table(rows, texts["policy"], texts["reference"], s.judge, seed=s.gen.seed)
        metrics.update(judged)
        return metrics, table
    return metrics, pd.DataFrame({"prompt": [json.loads(r["prompt"]) for r in rows],
                                  "policy_response": texts["policy"], "reference_response": texts["reference"]})
