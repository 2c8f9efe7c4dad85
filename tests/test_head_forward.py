"""forward.py's use of the head: ``correct_sum`` (TRL's mean_token_accuracy) and the
``grad_filter_eps`` pass-through of ``sequence_logps`` / ``pair_logps``."""

from __future__ import annotations

import pytest
import torch

from dpo_engine.modeling import logps as forward
from dpo_engine.modeling import CCE_FILTER_EPS

V = 300


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, tie_word_embeddings=True)).eval()


@torch.no_grad()
def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation (no cache): every token is the argmax after the ones before it."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("packed", [False, True])
def test_correct_sum_counts_argmax_targets(packed, monkeypatch):
    """Sequence 0 is a greedy completion (all tokens correct), sequence 1 greedy for 3 tokens and
    then random ones, sequence 2 random: against the model's own float32 logits argmax."""
    monkeypatch.setattr(forward, "HEAD_BACKEND", "torch")
    model = _model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (int(n),), generator=g).tolist() for n in (5, 9, 3)]
    rand = lambda k: torch.randint(0, V, (k,), generator=g).tolist()  # noqa: E731
    comps = [_greedy(model, prompts[0], 6), _greedy(model, prompts[1], 3) + rand(4), rand(8)]
    batch = (forward.pack if packed else forward.collate)(prompts, comps, 0)
    with torch.no_grad():
        res = forward.sequence_logps(model, batch, chunk_size=64, with_stats=True)
        kw = dict(position_ids=batch.position_ids) if packed else {}
        logits = model(input_ids=batch.input_ids, use_cache=False, **kw).logits.double()
    mask = batch.predict_mask
    hits = (logits[mask].argmax(-1) == batch.targets[mask]).double()
    ref = torch.zeros(3, dtype=torch.float64).index_add(0, batch.seq_ids[mask], hits)
    assert torch.equal(res["correct_sum"].double(), ref)
    assert res["correct_sum"][0] == res["n_tokens"][0] == 6
    assert 3 <= res["correct_sum"][1] < res["n_tokens"][1]
    assert not res["correct_sum"].requires_grad
    # chosen-side mean_token_accuracy as TRL logs it
    acc = res["correct_sum"].sum() / res["n_tokens"].sum()
    assert 0 < acc.item() < 1


def test_grad_filter_eps_reaches_the_head(monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["grad_filter_eps"])
        return token_logps(*args, **kwargs)

    token_logps = forward.token_logps
    monkeypatch.setattr(forward, "token_logps", spy)
    monkeypatch.setattr(forward, "HEAD_BACKEND", "torch")
    model = _model()
    rows = [{"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9], "rejected_input_ids": [10]}]
    default = forward.pair_logps(model, rows, 0)
    filtered = forward.pair_logps(model, rows, 0, grad_filter_eps=CCE_FILTER_EPS)
    assert seen == [0.0, CCE_FILTER_EPS]
    # filtering only changes the backward: the forward sums are identical
    assert torch.equal(default["chosen"], filtered["chosen"])
    batch = forward.pair_batch(rows, 0)
    forward.sequence_logps(model, batch, grad_filter_eps=0.5)
    assert seen[-1] == 0.5
