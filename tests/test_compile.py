"""Regional compilation of the decoder layers (``forward.compile_layers``): the compiled layers give
the eager log-probs and gradients, across sequence lengths, padded and packed. The test compiles with
the "eager" backend (dynamo's graph capture without code generation), which keeps it fast on a CPU;
the inductor backend that `train.compile` uses is measured on a GPU in BENCHMARKS.md."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpo_engine.modeling import logps as forward


def _model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2))


def _batches():
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(0, 300, (n,), generator=g).tolist()  # noqa: E731
    shapes = [[(5, 7), (9, 4)], [(3, 11), (12, 6), (4, 4)]]
    return [([ids(a) for a, _ in s], [ids(b) for _, b in s]) for s in shapes]


def test_compiled_layers_match_eager():
    torch._dynamo.reset()
    eager, compiled = _model(), _model()
    assert forward.compile_layers(compiled, backend="eager") == 2
    for build in (forward.collate, forward.pack):
        for prompts, comps in _batches():
            batch = build(prompts, comps, 0)
            outs = []
            for m in (eager, compiled):
                m.zero_grad()
                lp = forward.sequence_logps(m, batch)["logps"]
                lp.sum().backward()
                outs.append((lp.detach(), m.model.layers[1].mlp.down_proj.weight.grad.clone()))
            torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)


def test_compile_refuses_a_model_without_decoder_layers():
    model = _model()
    model.model.layers = torch.nn.ModuleList()
    with pytest.raises(TypeError, match="no list of decoder layers"):
        forward.compile_layers(model, backend="eager")


def test_train_compile_option_trains_the_compiled_layers_to_the_eager_weights(tmp_path, monkeypatch):
    """`train.compile=true` compiles the policy's layers before the first step (here with the eager
    backend) and training ends with the eager run's weights."""
    import pandas as pd

    from data_contracts.config import LossConfig, TrainConfig
    from dpo_engine.reference import compute_reference_logps
    from dpo_engine.training import train

    torch._dynamo.reset()
    calls = []
    real = forward.compile_layers
    monkeypatch.setattr(forward, "compile_layers",
                        lambda m, backend="inductor": calls.append(backend) or real(m, backend="eager"))
    prompts, comps = _batches()[1]
    pairs = pd.DataFrame([{"example_id": f"ex{i}", "prompt_input_ids": p, "chosen_input_ids": c,
                           "rejected_input_ids": c[::-1] + [7]} for i, (p, c) in enumerate(zip(prompts, comps))])
    ref = compute_reference_logps(_model(), pairs, pad_id=0, batch_size=3)
    weights = []
    for compiled in (False, True):
        model = _model()
        cfg = TrainConfig(learning_rate=1e-3, max_steps=2, seed=1, per_device_train_batch_size=3,
                          compile=compiled)
        train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / str(compiled))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert calls == ["inductor"]
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-5, atol=1e-6)
