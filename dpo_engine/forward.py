"""Batches of (prompt, completion) sequences and their summed completion log-probs.

The model body runs on the whole sequence; only hidden states that predict completion tokens go
through the fused head (prompt positions are never projected onto the vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dpo_engine.logprobs import token_logps


@dataclass
class SeqBatch:
    input_ids: torch.Tensor  # [S, T] right-padded
    attention_mask: torch.Tensor  # [S, T]
    predict_mask: torch.Tensor  # [S, T] True where the hidden state predicts a completion token
    targets: torch.Tensor  # [S, T] the token each position predicts (next token)

    def to(self, device) -> "SeqBatch":
        return SeqBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                  self.predict_mask, self.targets)))

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> SeqBatch:
    """Concatenate each prompt with its completion, right-pad, and mark completion predictions."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    s, t = len(lengths), max(lengths)
    ids = torch.full((s, t), pad_id, dtype=torch.long)
    att = torch.zeros((s, t), dtype=torch.long)
    pred = torch.zeros((s, t), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if len(p) == 0 or len(c) == 0:
            raise ValueError(f"sequence {i}: prompt and completion must be non-empty")
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor([int(x) for x in p] + [int(x) for x in c])
        att[i, :n] = 1
        pred[i, len(p) - 1:n - 1] = True
    targets = torch.cat([ids[:, 1:], torch.full((s, 1), pad_id, dtype=torch.long)], dim=1)
    return SeqBatch(ids, att, pred, targets)


def lm_body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body (returns last_hidden_state) and the LM head of a causal LM."""
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if cfg is not None and getattr(cfg, attr, None) not in (None, 1.0):
            raise NotImplementedError(f"models with config.{attr} are not supported by the fused head")
    head = model.get_output_embeddings()
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if body is None or head is None:
        raise TypeError(f"{type(model).__name__} does not expose a decoder body and an LM head")
    return body, head


def sequence_logps(model: nn.Module, batch: SeqBatch, *, chunk_size: int = 8192,
                   with_stats: bool = False) -> dict[str, torch.Tensor]:
    """Summed completion log-probs per sequence [S] (differentiable), token counts [S], and, with
    ``with_stats``, per-sequence sums of token entropy and of mean logit (for metrics)."""
    body, head = lm_body_and_head(model)
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    mask = batch.predict_mask
    s = mask.shape[0]
    seq_idx = torch.arange(s, device=mask.device)[:, None].expand_as(mask)[mask]
    out = token_logps(hidden[mask], head.weight, batch.targets[mask], getattr(head, "bias", None),
                      chunk_size=chunk_size, with_stats=with_stats)
    zeros = torch.zeros(s, device=hidden.device, dtype=out.logps.dtype)
    res = {"logps": zeros.index_add(0, seq_idx, out.logps),
           "n_tokens": mask.sum(dim=1)}
    if with_stats:
        res["entropy_sum"] = zeros.detach().index_add(0, seq_idx, out.entropy)
        res["mean_logit_sum"] = zeros.detach().index_add(0, seq_idx, out.mean_logit)
    return res


def pair_batch(rows: list[dict], pad_id: int) -> SeqBatch:
    """2B sequences for B pairs: the B chosen first, then the B rejected."""
    prompts = [r["prompt_input_ids"] for r in rows] * 2
    comps = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
    return collate(prompts, comps, pad_id)
