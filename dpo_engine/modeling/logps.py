"""Summed completion log-probs of a batch of sequences (``batching``), through the fused head.

The model body runs on the whole sequence; only hidden states that predict completion tokens go
through the fused head (prompt positions are never projected onto the vocabulary).

For the packed row the body is called with ``position_ids``, no attention mask and no KV cache:
transformers 5 then detects the sequence boundaries from the position ids
(``masking_utils.find_packed_sequence_indices``) and confines attention to each sequence —
flash-attention varlen on CUDA, a block-diagonal causal mask for sdpa/eager elsewhere.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from data_contracts.images import row_refs
from dpo_engine.modeling.batching import SeqBatch, collate, pack, pair_batch
from dpo_engine.modeling.fused_head import token_logps
from dpo_engine.modeling.loading import ModelError

# The batch builders are re-exported: a batch is what this module's functions take.
__all__ = ["HEAD_BACKEND", "SDPA_BACKENDS", "SeqBatch", "collate", "compile_layers", "ld_token_weights",
           "lm_body_and_head", "pack", "pair_batch", "pair_logps", "sequence_logps", "unwrap_model"]

SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# "auto": the Triton head on CUDA (verified on an H100, BENCHMARKS.md), the chunked torch path
# elsewhere; DPO_HEAD_BACKEND=torch forces the torch path everywhere.
HEAD_BACKEND = os.environ.get("DPO_HEAD_BACKEND", "auto")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain transformers model inside DDP/DataParallel and PEFT wrappers (adapter layers stay
    injected in it, so calling it runs the adapters, and ``disable_adapter()`` still applies)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            cfg = model.peft_config.get(getattr(model, "active_adapter", "default"))
            if cfg is not None and getattr(cfg, "is_prompt_learning", False):
                raise NotImplementedError("prompt-learning PEFT methods (prefix/prompt tuning) change the "
                                          "inputs and are not supported by the fused head")
            model = model.get_base_model()
        else:
            return model


def compile_layers(model: nn.Module, backend: str = "inductor") -> int:
    """torch.compile each decoder layer of the body (regional compilation: one graph, reused by every
    layer; ``dynamic=True`` so new sequence lengths do not recompile). Fuses the elementwise work of
    the layers (norms, rotary, activations), which dominates small models' steps on a GPU. The
    embedding and the fused head stay eager. Returns the number of layers compiled."""
    body, _ = lm_body_and_head(model)
    layers = next((m for m in body.children() if isinstance(m, nn.ModuleList) and len(m)), None)
    if layers is None:
        raise TypeError(f"{type(body).__name__} has no list of decoder layers to compile")
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def lm_body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body (returns last_hidden_state) and the LM head of a causal LM, also through
    DDP and PEFT wrappers."""
    model = unwrap_model(model)
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if cfg is not None and getattr(cfg, attr, None) not in (None, 1.0):
            raise NotImplementedError(f"models with config.{attr} are not supported by the fused head")
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    prefix = getattr(model, "base_model_prefix", "") or "model"
    body = getattr(model, prefix, None)
    if not isinstance(body, nn.Module) or not isinstance(getattr(head, "weight", None), torch.Tensor):
        missing = " and ".join(w for w, bad in (
            (f"decoder body at .{prefix} (a module returning last_hidden_state)", not isinstance(body, nn.Module)),
            ("output embedding (get_output_embeddings() with a .weight)",
             not isinstance(getattr(head, "weight", None), torch.Tensor))) if bad)
        raise ModelError(f"{type(model).__name__} cannot train on the fused head: it has no {missing}; "
                         "pass the transformers *ForCausalLM (or *ForConditionalGeneration) model itself, "
                         "patched or not")
    return body, head


def ld_token_weights(batch: SeqBatch, min_len: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO: weight 1 for the first ``min_len[s]`` completion tokens of sequence s, ``alpha`` after
    (``min_len`` = the shorter completion of the pair). Flat, in predict-mask order."""
    mask = batch.predict_mask
    seq_idx = batch.seq_ids[mask]  # each sequence's tokens are contiguous in this flat order
    counts = torch.bincount(seq_idx, minlength=batch.num_seqs)
    pos = torch.arange(seq_idx.numel(), device=mask.device) - (counts.cumsum(0) - counts)[seq_idx]
    return torch.where(pos < min_len.to(mask.device)[seq_idx], 1.0, float(alpha))


def _extras(batch: SeqBatch, body: nn.Module) -> dict:
    """The batch's further body inputs (a VLM's image inputs), floating ones in the weights' dtype."""
    if not batch.extras:
        return {}
    dtype = body.get_input_embeddings().weight.dtype
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.extras.items()}


def sequence_logps(model: nn.Module, batch: SeqBatch, *, chunk_size: int = 8192,
                   with_stats: bool = False, token_weights: torch.Tensor | None = None,
                   grad_filter_eps: float = 0.0, router_logits: bool = False) -> dict[str, torch.Tensor]:
    """Summed completion log-probs per sequence [S] (differentiable) and token counts [S].

    ``token_weights`` (flat, predict-mask order) weights each token's log-prob in the sum (LD-DPO);
    ``unweighted_logps`` then holds the plain sums. ``with_stats`` adds per-sequence sums of token
    entropy, mean logit and ``correct_sum`` (tokens whose target is an argmax of the logits, ties
    counted as correct; ``correct_sum / n_tokens`` over the chosen sequences is TRL's
    ``mean_token_accuracy``) and ``wpo_log_weight`` = mean over tokens of
    [log p(token) - log sum_v p(v)^2] (WPO), all without gradient. ``grad_filter_eps`` is the
    head's gradient filtering (``token_logps``; 0 = exact gradients). ``router_logits`` (a
    mixture-of-experts model): the body also returns each MoE layer's router logits
    (``output_router_logits``), in ``router_logits``: one [R * T, experts] tensor per layer."""
    body, head = lm_body_and_head(model)
    routers = {"output_router_logits": True} if router_logits else {}
    # sdpa without its cuDNN backend: cuDNN builds an execution graph for every new sequence length
    # (every batch here), ~15 ms of CPU per layer call on an H100 (bench/profile_train_step.py)
    with sdpa_kernel(SDPA_BACKENDS):
        if batch.packed:  # no mask and no cache: the boundaries come from the restarting position ids
            body_out = body(input_ids=batch.input_ids, position_ids=batch.position_ids,
                            use_cache=False, **routers)
        else:
            # Right padding: under causal attention no real token sees a pad (pads come after it),
            # so the mask is left out; the body then runs plain causal attention (flash/efficient
            # kernels) instead of a [S, 1, T, T] padding mask. Pad positions are never read.
            body_out = body(input_ids=batch.input_ids, use_cache=False, **_extras(batch, body), **routers)
    hidden = body_out.last_hidden_state
    mask = batch.predict_mask
    s = batch.num_seqs
    seq_idx = batch.seq_ids[mask]
    out = token_logps(hidden[mask], head.weight, batch.targets[mask], getattr(head, "bias", None),
                      chunk_size=chunk_size, with_stats=with_stats,
                      grad_filter_eps=grad_filter_eps, backend=HEAD_BACKEND)
    zeros = torch.zeros(s, device=hidden.device, dtype=out.logps.dtype)
    n_tokens = torch.bincount(seq_idx, minlength=s)
    res = {"n_tokens": n_tokens, "logps": zeros.index_add(0, seq_idx, out.logps)}
    if router_logits:
        res["router_logits"] = body_out.router_logits
    if token_weights is not None:
        res["unweighted_logps"] = res["logps"]
        res["logps"] = zeros.index_add(0, seq_idx, out.logps * token_weights.to(out.logps))
    if with_stats:
        res["entropy_sum"] = zeros.detach().index_add(0, seq_idx, out.entropy)
        res["mean_logit_sum"] = zeros.detach().index_add(0, seq_idx, out.mean_logit)
        res["correct_sum"] = zeros.detach().index_add(0, seq_idx, out.correct)
        lsp2 = getattr(out, "log_sum_p2", None)
        if lsp2 is not None:
            terms = out.logps.detach() - lsp2
            res["wpo_log_weight"] = zeros.detach().index_add(0, seq_idx, terms) / n_tokens.clamp(min=1)
    return res


def pair_logps(model: nn.Module, rows: list[dict], pad_id: int, *, loss_cfg=None, chunk_size: int = 8192,
               with_stats: bool = False, device: torch.device | str = "cpu",
               padding_free: bool = False, pad_to_multiple_of: int | None = None,
               grad_filter_eps: float = 0.0, vision=None, router_logits: bool = False) -> dict:
    """Forward a micro-batch of pairs; returns the policy sums split into chosen/rejected and the
    extra loss inputs (token counts; WPO weights; LD-DPO weighting) that ``loss_from_config`` takes.
    ``padding_free`` packs the 2B sequences into one row (same results as the padded layout);
    ``pad_to_multiple_of`` rounds the padded rows' length up (the padded layout only);
    ``grad_filter_eps`` goes to the head (``sequence_logps``); ``vision``: a vision-language model's
    ``modeling.vision.VisionInputs``, which adds the rows' image inputs to the batch; ``router_logits``:
    ``seq["router_logits"]`` holds the body's router logits (``sequence_logps``)."""
    batch = pair_batch(rows, pad_id, packed=padding_free, pad_to_multiple_of=pad_to_multiple_of)
    if vision is not None:
        batch.extras = vision.pair_inputs(rows, batch) or None
    elif any(row_refs(r) for r in rows):
        raise ValueError("the rows hold images: pass vision=VisionInputs(processor, model)")
    batch = batch.to(device)
    b = len(rows)
    weights = None
    ld_alpha = getattr(loss_cfg, "ld_alpha", None)
    if ld_alpha is not None:
        lc = torch.tensor([len(r["chosen_input_ids"]) for r in rows])
        lr = torch.tensor([len(r["rejected_input_ids"]) for r in rows])
        weights = ld_token_weights(batch, torch.minimum(lc, lr).repeat(2), ld_alpha)
    wpo = bool(getattr(loss_cfg, "use_weighting", False))
    seq = sequence_logps(model, batch, chunk_size=chunk_size, with_stats=with_stats or wpo,
                         token_weights=weights, grad_filter_eps=grad_filter_eps, router_logits=router_logits)
    lens = seq["n_tokens"]
    inputs = {"chosen_len": lens[:b], "rejected_len": lens[b:]}
    if wpo:
        inputs["chosen_log_weight"] = seq["wpo_log_weight"][:b]
        inputs["rejected_log_weight"] = seq["wpo_log_weight"][b:]
    if weights is not None:
        inputs["sft_chosen_logps"] = seq["unweighted_logps"][:b]
    return {"chosen": seq["logps"][:b], "rejected": seq["logps"][b:], "seq": seq, "batch": batch,
            "loss_inputs": inputs, "ld_weighted": weights is not None}
