"""The engine on tiny vision-language models of two architectures (LLaVA, Idefics3): the fused head
equals full logits (values and gradients), the precomputed reference equals an online pass, the
vision tower stays frozen (LoRA on the language model only), and a training killed mid-way and
restarted ends with the uninterrupted run's weights."""

import pytest
import torch

from data_contracts.config import DataConfig, LossConfig, PeftConfig, TrainConfig
from data_contracts.validation import read_valid, validate_split
from dpo_engine.modeling import (VisionInputs, apply_adapter, freeze_vision, language_model_peft, pair_logps,
                                 sequence_logps)
from dpo_engine.modeling.vision import vision_tower
from dpo_engine.reference import compute_reference_logps
from dpo_engine.training import train
from tiny_vlm import ARCHS, color_rows, tiny_vlm


def _validated(arch: str, tmp):
    """(arch, model, processor, validated rows) for one architecture."""
    model, proc = tiny_vlm(arch)
    rows = [{**r, "image": str(tmp / "data" / r["image"])} for r in color_rows(tmp / "data", 6)]
    rows[5]["images"], rows[5]["image"] = [rows[5]["image"], rows[4]["image"]], None  # two images
    rows[5]["prompt"][0]["content"].insert(0, {"type": "image"})
    validate_split(rows, tmp / "valid", proc.tokenizer, DataConfig(max_length=96), processor=proc)
    return arch, model, proc, read_valid(tmp / "valid" / "valid.parquet")


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request, tmp_path_factory):
    return _validated(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return _validated("llava", tmp_path_factory.mktemp("resume"))


def _full_logits_logps(model, batch):
    logits = model(input_ids=batch.input_ids, use_cache=False, **batch.extras).logits
    lp = torch.log_softmax(logits.double(), -1).gather(-1, batch.targets[..., None])[..., 0]
    return torch.zeros(batch.num_seqs, dtype=lp.dtype).index_add(0, batch.seq_ids[batch.predict_mask],
                                                                 lp[batch.predict_mask])


def test_fused_head_equals_full_logits_values_and_gradients(vlm):
    arch, model, proc, pairs = vlm
    model = model.double()
    try:
        rows = pairs.to_dict("records")
        vision = VisionInputs(proc, model)
        params = [p for p in model.parameters() if p.requires_grad]

        def grads(loss):
            model.zero_grad()
            loss.backward()
            return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

        fw = pair_logps(model, rows, proc.tokenizer.pad_token_id, vision=vision, chunk_size=37)
        fused = torch.cat([fw["chosen"], fw["rejected"]])
        g_fused = grads(fused @ torch.linspace(-1, 1, fused.numel(), dtype=fused.dtype))
        full = _full_logits_logps(model, fw["batch"])
        g_full = grads(full @ torch.linspace(-1, 1, full.numel(), dtype=full.dtype))
        torch.testing.assert_close(fused, full, rtol=0, atol=1e-10)
        for a, b in zip(g_fused, g_full):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        tower = {id(p) for _, m in vision_tower(model) for p in m.parameters()}
        assert any(g.abs().sum() > 0 for p, g in zip(params, g_fused) if id(p) in tower)  # images reach the loss
        batch = fw["batch"]  # and the images matter: other pixels, other log-probs
        batch.extras = {k: (v.flip(-1) if k == "pixel_values" else v) for k, v in batch.extras.items()}
        with torch.no_grad():
            other = sequence_logps(model, batch)["logps"]
        assert (other - fused.detach()).abs().max() > 1e-6
    finally:
        model.float()


def test_precomputed_reference_equals_online_pass(vlm):
    arch, model, proc, pairs = vlm
    vision = VisionInputs(proc, model)
    pad = proc.tokenizer.pad_token_id
    # length-sorted batches of 3 sequences mix the sides of different pairs: each keeps its own images
    cached = compute_reference_logps(model, pairs, pad_id=pad, batch_size=3, vision=vision)
    with torch.no_grad():
        online = pair_logps(model, pairs.to_dict("records"), pad, vision=vision)
    torch.testing.assert_close(torch.tensor(cached["ref_chosen_logps"].to_numpy()), online["chosen"].double(),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(cached["ref_rejected_logps"].to_numpy()), online["rejected"].double(),
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="rows hold images"):
        compute_reference_logps(model, pairs, pad_id=pad, batch_size=3)


def test_vision_tower_frozen_and_lora_on_the_language_model(vlm):
    arch, _, _, _ = vlm
    model, _ = tiny_vlm(arch)
    n = freeze_vision(model)
    towers = vision_tower(model)
    assert n == sum(p.numel() for _, m in towers for p in m.parameters()) > 0
    assert all(p.requires_grad for name, p in model.named_parameters()
               if not any(name.startswith(t + ".") for t, _ in towers))
    peft = apply_adapter(model, language_model_peft(PeftConfig(enabled=True, r=4), True))
    lora = [name for name, _ in peft.named_parameters() if "lora_" in name]
    assert lora and not any(w in name for name in lora for w in ("vision", "projector", "connector"))


def test_training_killed_midway_resumes_to_the_uninterrupted_weights(tmp_path, llava):
    arch, _, proc, pairs = llava
    pad = proc.tokenizer.pad_token_id
    ref_model, _ = tiny_vlm(arch)
    ref = compute_reference_logps(ref_model, pairs, pad_id=pad, batch_size=4, vision=VisionInputs(proc, ref_model))
    cfg = TrainConfig(learning_rate=1e-2, max_steps=5, save_steps=1, per_device_train_batch_size=2, seed=3)

    def run(out, kill_at=None):
        model, _ = tiny_vlm(arch)
        freeze_vision(model)

        def progress(step, metrics):
            if step == kill_at:
                raise KeyboardInterrupt("killed")  # the process dies here: step 3 is never checkpointed

        res = train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=pad, out_dir=out,
                    progress=progress, vision=VisionInputs(proc, model))
        return model, res

    straight, _ = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", kill_at=3)
    resumed, res = run(tmp_path / "killed")
    assert res.resumed_from == 2 and res.steps == 5
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    base, _ = tiny_vlm(arch)
    tower = dict(vision_tower(resumed)[0][1].named_parameters())
    base_tower = dict(vision_tower(base)[0][1].named_parameters())
    assert all(torch.equal(tower[k], base_tower[k]) for k in tower)  # frozen: never moved
    assert not torch.equal(resumed.get_output_embeddings().weight, base.get_output_embeddings().weight)
