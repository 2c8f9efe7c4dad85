"""Models built or patched elsewhere (speed libraries, user code): a model whose decoder layers are
wrapped and whose forward is replaced trains through the same fused-head path, to the same weights;
a model without what the engine needs is refused in one line naming what is missing."""

import pandas as pd
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from data_contracts.config import LossConfig, TrainConfig
from dpo_engine.modeling import ModelError, lm_body_and_head
from dpo_engine.reference import compute_reference_logps
from dpo_engine.training import train
from tiny import tiny_model_dir


class Wrapped(nn.Module):
    """What activation-checkpoint / offload / kernel wrappers look like: the layer inside, same call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def _pairs(n=6, vocab=90):
    g = torch.Generator().manual_seed(3)
    rand = lambda lo, hi: torch.randint(5, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),),  # noqa: E731
                                        generator=g).tolist()
    return pd.DataFrame([{"example_id": f"e{i}", "prompt_input_ids": rand(3, 8), "chosen_input_ids": rand(1, 5) + [2],
                          "rejected_input_ids": rand(1, 5) + [2]} for i in range(n)])


def _train(model, pairs, ref, out):
    cfg = TrainConfig(learning_rate=1e-3, max_steps=3, seed=1, per_device_train_batch_size=3)
    return train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=out)


def test_wrapped_layers_and_replaced_forward_train_to_the_same_weights(tmp_path):
    d = tiny_model_dir(tmp_path / "m")
    pairs = _pairs()
    plain = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ref = compute_reference_logps(plain, pairs, pad_id=0, batch_size=4)
    patched = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    layers = patched.model.layers
    for i, layer in enumerate(layers):
        layers[i] = Wrapped(layer)

    def replaced_forward(*a, **k):  # e.g. a fused-loss forward of a speed library: never called here
        raise AssertionError("the engine must not call the model's own forward")

    patched.forward = replaced_forward
    _train(plain, pairs, ref, tmp_path / "a")
    _train(patched, pairs, ref, tmp_path / "b")
    assert all(layer.calls > 0 for layer in layers)  # the wrapped layers ran
    a = torch.cat([p.detach().flatten() for p in plain.parameters()])
    b = torch.cat([p.detach().flatten() for p in patched.parameters()])
    assert not torch.allclose(a, torch.cat([p.detach().flatten() for p in AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32).parameters()]))  # it trained
    assert torch.equal(a, b)


@pytest.mark.parametrize("break_it, needle", [
    (lambda m: setattr(m, "model", None), "no decoder body at .model"),
    (lambda m: setattr(m, "get_output_embeddings", lambda: None), "no output embedding"),
])
def test_a_model_without_body_or_head_is_refused_in_one_line(tmp_path, break_it, needle):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path / "m"), dtype=torch.float32)
    break_it(model)
    with pytest.raises(ModelError, match=needle) as e:
        lm_body_and_head(model)
    assert "\n" not in str(e.value) and "LlamaForCausalLM" in str(e.value)
