"""The fused head on a model with TIED input/output embeddings, under CPU bf16 autocast.

The head's weight is then also the embedding matrix: its gradient is the sum of the head part
(from ``token_logps``'s backward) and the embedding part (through the body), and the bf16 body sits
between them. Compared against the same model with a naive head (logits, log_softmax, gather):
in fp32 (the fused torch path's own precision, so only the bf16 body's rounding differs) and the
model's own bf16 ``lm_head`` (what TRL computes under autocast; bf16 tolerance).
"""

from __future__ import annotations

import pytest
import torch

from dpo_engine.modeling import logps as forward

V = 300  # several vocabulary tiles at chunk_size=64


def _tied_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def _batch(packed: bool) -> forward.SeqBatch:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in (5, 9, 3)]
    comps = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in (7, 4, 11)]
    return (forward.pack if packed else forward.collate)(prompts, comps, 0)


def _naive_sequence_logps(model, batch: forward.SeqBatch, head_only=False) -> torch.Tensor:
    """sequence_logps with the head done the plain way: fp32 logits [N, V] outside autocast
    (``head_only``: the body's output detached, so only the head part reaches the weight)."""
    body, head = forward.lm_body_and_head(model)
    kw = dict(position_ids=batch.position_ids) if batch.packed else {}
    hidden = body(input_ids=batch.input_ids, use_cache=False, **kw).last_hidden_state
    if head_only:
        hidden = hidden.detach()
    mask = batch.predict_mask
    with torch.autocast("cpu", enabled=False):
        logits = hidden[mask].float() @ head.weight.float().t()
        logp = logits.log_softmax(-1).gather(1, batch.targets[mask][:, None]).squeeze(1)
    return torch.zeros(batch.num_seqs).index_add(0, batch.seq_ids[mask], logp)


def _hf_sequence_logps(model, batch: forward.SeqBatch) -> torch.Tensor:
    """The model's own forward: full logits from its lm_head (bf16 under autocast)."""
    kw = dict(position_ids=batch.position_ids) if batch.packed else {}
    logits = model(input_ids=batch.input_ids, use_cache=False, **kw).logits
    mask = batch.predict_mask
    logp = logits[mask].float().log_softmax(-1).gather(1, batch.targets[mask][:, None]).squeeze(1)
    return torch.zeros(batch.num_seqs).index_add(0, batch.seq_ids[mask], logp)


def _rel(a, r):
    return ((a.double() - r.double()).norm() / r.double().norm()).item()


@pytest.mark.parametrize("packed", [False, True])
def test_tied_weight_gradients_under_bf16_autocast(packed, monkeypatch):
    monkeypatch.setattr(forward, "HEAD_BACKEND", "torch")
    model = _tied_model()
    batch = _batch(packed)
    up = torch.tensor([0.7, -1.3, 0.4])  # a different upstream gradient per sequence
    runs = {"fused": lambda: forward.sequence_logps(model, batch, chunk_size=64)["logps"],
            "naive": lambda: _naive_sequence_logps(model, batch),
            "naive_head_only": lambda: _naive_sequence_logps(model, batch, head_only=True),
            "hf_bf16_head": lambda: _hf_sequence_logps(model, batch)}
    results = []
    for run in runs.values():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = run()
        (lp * up).sum().backward()
        results.append((lp.detach(), model.lm_head.weight.grad.clone()))
    (lp_fused, gw_fused), (lp_ref, gw_ref), (_, gw_head), (lp_hf, gw_hf) = results
    assert lp_fused.dtype == torch.float32 and gw_fused.dtype == torch.float32
    # fp32 heads on the same bf16 hidden states: ~1e-7 measured, far inside bf16's 2^-8
    assert _rel(lp_fused, lp_ref) < 1e-3 and _rel(gw_fused, gw_ref) < 1e-3, \
        (_rel(lp_fused, lp_ref), _rel(gw_fused, gw_ref))
    # the bf16 lm_head: ~3e-3 on the weight gradient
    assert _rel(lp_fused, lp_hf) < 1e-2 and _rel(gw_fused, gw_hf) < 1e-2, \
        (_rel(lp_fused, lp_hf), _rel(gw_fused, gw_hf))
    # both parts are well above the tolerance, so losing either one would fail the check above
    assert _rel(gw_head, gw_ref) > 0.1 and _rel(gw_ref - gw_head, gw_ref) > 0.1
