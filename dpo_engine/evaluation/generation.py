"""Generation from the policy and the reference, and the per-sample log-ratio that estimates
KL(policy || reference) on the policy's own samples."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
from torch import nn

from data_contracts.config import EvalConfig
from dpo_engine.modeling import collate, seeded, sequence_logps


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, prompts: list[list[int]], cfg: EvalConfig,
             device: torch.device | str = "cpu",
             progress: Callable[[int], None] | None = None, images: list[list[dict]] | None = None,
             vision=None) -> list[list[int]]:
    """Batched left-padded generation; returns the new token ids of each prompt (EOS stripped).
    ``images``: each prompt's image references (a vision-language model, with its ``vision``
    inputs builder); the prompts then hold their expanded image tokens."""
    model.eval()
    pad = tokenizer.pad_token_id
    outs: list[list[int]] = []
    for b0 in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[b0:b0 + cfg.batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
        att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        extras = {} if vision is None else {k: v.to(device) for k, v in vision.inputs(
            (images or [[]] * len(prompts))[b0:b0 + cfg.batch_size], ids.cpu()).items()}
        if vision is not None and vision.special_ids:  # image tokens stand for images: never generated
            extras["suppress_tokens"] = vision.special_ids
        with seeded(cfg.seed + b0) if cfg.do_sample else nullcontext():  # greedy draws nothing
            gen = model.generate(input_ids=ids, attention_mask=att, **extras, max_new_tokens=cfg.max_new_tokens,
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
              max_new_tokens: int | None = None, device: torch.device | str = "cpu",
              images: list[list[dict]] | None = None, vision=None) -> np.ndarray:
    """Per-sequence log pi(y|x) - log ref(y|x) on ``samples`` (as :func:`generate` returns them:
    EOS stripped); their mean is a Monte-Carlo estimate of KL(policy || reference), unbiased when
    the samples are drawn from pi itself (temperature 1, top_p 1: see :func:`kl_sampling`). A sample
    shorter than ``max_new_tokens`` ended with EOS, which is scored; one cut at the limit is scored
    without it (its probability is that of the prefix). ``images``/``vision``: as :func:`generate`'s."""
    diffs = []
    for b0 in range(0, len(prompts), batch_size):
        ps = prompts[b0:b0 + batch_size]
        cs = [list(s) + ([] if max_new_tokens is not None and len(s) >= max_new_tokens else [eos_id])
              for s in samples[b0:b0 + batch_size]]
        batch = collate(ps, cs, pad_id)
        if vision is not None:
            batch.extras = vision.inputs((images or [[]] * len(prompts))[b0:b0 + batch_size], batch.input_ids) or None
        batch = batch.to(device)
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
