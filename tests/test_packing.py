"""Padding-free packing: one row per micro-batch gives the padded layout's log-probs, losses, grads."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from data_contracts.config import LossConfig, TrainConfig
from dpo_engine.modeling import collate, pack, pair_batch, pair_logps, sequence_logps
from dpo_engine.modeling import loss_from_config
from dpo_engine.reference import compute_reference_logps
from dpo_engine.training import train
from test_trainer import _pairs
from tiny import tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m")


def _load(d, attn="sdpa"):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation=attn)


def test_pack_layout():
    b = pack([[5, 6], [7]], [[8, 9], [10]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 8, 9, 7, 10]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1]]
    assert b.seq_ids.tolist() == [[0, 0, 0, 0, 1, 1]]
    # position 3 (last of sequence 0) predicts nothing: no prediction across the boundary
    assert b.predict_mask.tolist() == [[False, True, True, False, True, False]]
    assert b.targets[0, 1:3].tolist() == [8, 9] and b.targets[0, 4].item() == 10
    assert b.num_seqs == 2 and b.num_tokens == 6


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded_logps_losses_and_grads(tiny_dir, attn):
    rows = _pairs(n=6, seed=3).to_dict("records")
    ref_c, ref_r = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    cfg = LossConfig(loss_type=["sigmoid", "sft"], ld_alpha=0.5, use_weighting=True)
    res = {}
    for packed in (False, True):
        model = _load(tiny_dir, attn)
        fw = pair_logps(model, rows, 0, loss_cfg=cfg, with_stats=True, padding_free=packed)
        out = loss_from_config(cfg, fw["chosen"], fw["rejected"], ref_c, ref_r,
                               ld_weighted=fw["ld_weighted"], **fw["loss_inputs"])
        out.losses.sum().backward()
        res[packed] = (fw, out.losses.detach(), _grads(model))
        assert fw["batch"].packed is packed
    (a, la, ga), (b, lb, gb) = res[False], res[True]
    assert b["batch"].input_ids.shape[0] == 1 and b["batch"].num_tokens == a["batch"].num_tokens
    for k in ("chosen", "rejected"):
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    for k in ("entropy_sum", "mean_logit_sum", "wpo_log_weight", "n_tokens", "unweighted_logps"):
        assert torch.allclose(a["seq"][k].double(), b["seq"][k].double(), atol=1e-5), k
    assert torch.allclose(la, lb, atol=1e-5)
    assert torch.allclose(ga, gb, atol=1e-5)


def test_packed_matches_separate_full_forwards(tiny_dir):
    """Each packed sequence's log-probs equal running that sequence alone (no cross-attention)."""
    model = _load(tiny_dir)
    prompts, comps = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], [[20, 21], [22, 23, 24], [25]]
    with torch.no_grad():
        packed = sequence_logps(model, pack(prompts, comps, 0))["logps"]
        alone = torch.cat([sequence_logps(model, collate([p], [c], 0))["logps"]
                           for p, c in zip(prompts, comps)])
    assert torch.allclose(packed, alone, atol=1e-5)


def test_padding_free_training_gives_the_same_weights(tiny_dir, tmp_path):
    pairs = _pairs()
    ref = compute_reference_logps(_load(tiny_dir), pairs, pad_id=0, batch_size=5)
    weights = {}
    for packed in (False, True):
        model = _load(tiny_dir)
        cfg = TrainConfig(learning_rate=1e-3, max_steps=3, seed=1, per_device_train_batch_size=4,
                          padding_free=packed)
        res = train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0,
                    out_dir=tmp_path / str(packed))
        weights[packed] = torch.cat([p.detach().flatten() for p in model.parameters()])
        if packed:
            assert abs(res.history[0]["loss"] - 0.693147) < 1e-5
    assert torch.allclose(weights[False], weights[True], atol=1e-5)


def test_pair_batch_orders_chosen_then_rejected_when_packed():
    rows = _pairs(n=2).to_dict("records")
    b = pair_batch(rows, 0, packed=True)
    lens = [len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) for r in rows] + \
           [len(r["prompt_input_ids"]) + len(r["rejected_input_ids"]) for r in rows]
    assert torch.bincount(b.seq_ids[0]).tolist() == lens


def test_pad_to_multiple_of_changes_shapes_not_results(tiny_dir, tmp_path):
    b = collate([[5, 6], [7]], [[8, 9, 10], [11]], pad_id=0, pad_to_multiple_of=8)
    assert b.input_ids.shape == (2, 8) and b.num_tokens == 7
    assert collate([[5] * 8], [[6] * 8], 0, pad_to_multiple_of=8).input_ids.shape == (1, 16)
    pairs = _pairs()
    ref = compute_reference_logps(_load(tiny_dir), pairs, pad_id=0, batch_size=5)
    weights, losses = {}, {}
    for multiple in (None, 64):
        model = _load(tiny_dir)
        cfg = TrainConfig(learning_rate=1e-3, max_steps=3, seed=1, per_device_train_batch_size=4,
                          pad_to_multiple_of=multiple)
        res = train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / str(multiple))
        weights[multiple] = torch.cat([p.detach().flatten() for p in model.parameters()])
        losses[multiple] = [h["loss"] for h in res.history]
    assert losses[None] == pytest.approx(losses[64], abs=1e-6)
    assert torch.allclose(weights[None], weights[64], atol=1e-6)


def test_packing_picks_flash_attention_varlen_on_cuda_when_installed(monkeypatch):
    import importlib.util

    from data_contracts.config import ModelConfig
    from dpo_engine.modeling import packed_attention

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a))
    cfg = ModelConfig()
    assert packed_attention(cfg, True, "cuda").init_kwargs == {"attn_implementation": "flash_attention_2"}
    assert packed_attention(cfg, False, "cuda") is cfg  # padded batches: sdpa's flash kernel already
    assert packed_attention(cfg, True, "cpu") is cfg
    chosen = ModelConfig(init_kwargs={"attn_implementation": "sdpa"})
    assert packed_attention(chosen, True, "cuda") is chosen  # the user's choice stands
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "flash_attn" else real(n, *a))
    assert packed_attention(cfg, True, "cuda") is cfg  # not installed: the block-diagonal mask fallback
