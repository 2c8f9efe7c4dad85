"""Mixture-of-experts policies: TRL's router auxiliary loss (loss + coef * aux_loss).

The gradient of a training step equals autograd of [preference loss + coef * the model's own
``output_router_logits=True`` aux_loss] over the step's pairs as one batch, for three architectures;
the step's aux_loss and gradient are the same for every accumulation split and layout (the aux of a
step is that of all its tokens: dpo_engine/training/router_aux.py); split over simulated ranks they
add up to it; the reference passes compute no router logits; config errors are one line.
"""

from pathlib import Path

import pytest
import torch

from data_contracts.config import ConfigError, LossConfig, TrainConfig, load_config
from dpo_engine.modeling import loss_from_config, pair_logps
from dpo_engine.modeling.router import check_router_setting, router_of
from dpo_engine.reference import compute_reference_logps
from dpo_engine.training import optim, pair_order, router_aux, train
from test_trainer import _pairs
from tiny import tiny_model_dir
from tiny_moe import ARCHS, tiny_moe, tiny_moe_dir

COEF = 0.1  # the tiny models' config coefficient: large, so that the aux visibly moves the gradient


class _GradRecorder(torch.optim.Optimizer):
    """Keeps the gradients it is asked to step with, and leaves the weights alone."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1e-3})
        self.grads = None

    def step(self, closure=None):
        self.grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                for g in self.param_groups for p in g["params"]])


@pytest.fixture
def step_grads(monkeypatch, tmp_path):
    """``(arch, pairs, ref, **train) -> (gradient of one step, its metrics)``."""
    recorders = []

    def make(params, cfg, device):
        recorders.append(_GradRecorder(params))
        return recorders[-1]

    monkeypatch.setattr(optim, "make_optimizer", make)

    def run(arch, pairs, ref, **kw):
        cfg = TrainConfig(**{"max_steps": 1, "max_grad_norm": 0.0, "seed": 1, **kw})
        res = train(tiny_moe(arch, coef=COEF), pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0,
                    out_dir=tmp_path / f"run{len(recorders)}")
        return recorders[-1].grads, res.history[0]

    return run


def _ref(arch, pairs):
    return compute_reference_logps(tiny_moe(arch), pairs, pad_id=0, batch_size=4)


def _by_hand(arch, pairs, ref, rows=None):
    """Autograd of mean DPO loss + COEF * the model's own aux_loss (its forward with the padding
    mask and output_router_logits=True) over ``rows`` (default: every pair) as one batch."""
    model = tiny_moe(arch, coef=COEF)
    sub = pairs if rows is None else pairs.iloc[rows]
    fw = pair_logps(model, sub.to_dict("records"), 0)
    r = ref.set_index("example_id").loc[sub["example_id"]]
    out = loss_from_config(LossConfig(), fw["chosen"], fw["rejected"], torch.tensor(r["ref_chosen_logps"].values),
                           torch.tensor(r["ref_rejected_logps"].values), **fw["loss_inputs"])
    b = fw["batch"]
    aux = model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_router_logits=True).aux_loss
    (out.losses.mean() + COEF * aux).backward()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
    return grads, aux.item(), out.losses.mean().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_step_gradient_is_loss_plus_coef_aux_whatever_the_split(arch, step_grads):
    """1 micro-batch of 4 == autograd of loss + coef * aux_loss; == 2 of 2 == 4 of 1 packed (the step's
    aux is that of its 4 pairs, not a mean of per-micro-batch aux as TRL's accumulation gives)."""
    pairs = _pairs(4)
    ref = _ref(arch, pairs)
    expected, aux, dpo = _by_hand(arch, pairs, ref)
    one, m1 = step_grads(arch, pairs, ref, per_device_train_batch_size=4)  # unset: the config's coef
    two, m2 = step_grads(arch, pairs, ref, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    four, m4 = step_grads(arch, pairs, ref, per_device_train_batch_size=1, gradient_accumulation_steps=4,
                          padding_free=True)
    off, m0 = step_grads(arch, pairs, ref, per_device_train_batch_size=4, router_aux_loss_coef=0.0)
    scale = expected.abs().max().item()
    for got in (one, two, four):
        assert (got - expected).abs().max().item() < 1e-6 * max(scale, 1.0)
    assert (one - off).abs().max().item() > 100 * (one - expected).abs().max().item()  # the aux mattered
    for m in (m1, m2, m4):
        assert m["aux_loss"] == pytest.approx(aux, rel=1e-6)
        assert m["loss"] == pytest.approx(dpo + COEF * aux, rel=1e-6)  # the optimised loss, as TRL logs it
    assert "aux_loss" not in m0 and m0["loss"] == pytest.approx(dpo, rel=1e-6)
    # what TRL's accumulation would log instead: the mean of the two micro-batches' own aux
    order = pair_order(4, 4, 1)
    halves = [_by_hand(arch, pairs, ref, order[i:i + 2])[1] for i in (0, 2)]
    assert abs(sum(halves) / 2 - aux) > 1e-4


def test_simulated_ranks_add_up_to_the_whole_step(monkeypatch):
    """Two ranks' surrogates (their rows of the step, the others' all-gathered) sum to the gradient
    of coef * aux over both ranks' pairs: the replicated path sums gradients over ranks."""
    arch = "qwen3_moe"
    pairs = _pairs(4).to_dict("records")
    models = [tiny_moe(arch) for _ in range(2)]
    router = router_of(models[0])
    with torch.no_grad():  # what each rank would contribute to the all-gather
        seen = [pair_logps(m, pairs[2 * r:2 * r + 2], 0, router_logits=True) for r, m in enumerate(models)]
    everyone = [(torch.stack([z.float() for z in s["seq"]["router_logits"]], dim=1),
                 s["batch"].attention_mask.reshape(-1).float()) for s in seen]
    for r, model in enumerate(models):
        monkeypatch.setattr(router_aux, "_gather_rows", lambda x, n: [e[0 if x.dim() == 3 else 1] for e in everyone])
        monkeypatch.setattr(router_aux.dist, "get_rank", lambda r=r: r)
        aux = router_aux.StepAux(router, COEF, 1, n_ranks=2)
        fw = pair_logps(model, pairs[2 * r:2 * r + 2], 0, router_logits=True)
        aux.surrogate(0, fw["seq"]["router_logits"], fw["batch"].attention_mask).backward()
    whole = tiny_moe(arch)
    b = pair_logps(whole, pairs, 0)["batch"]
    aux = whole(input_ids=b.input_ids, attention_mask=b.attention_mask, output_router_logits=True).aux_loss
    (COEF * aux).backward()
    for p0, p1, pw in zip(models[0].parameters(), models[1].parameters(), whole.parameters()):
        summed = sum(p.grad if p.grad is not None else torch.zeros_like(p) for p in (p0, p1))
        assert torch.allclose(summed, pw.grad if pw.grad is not None else torch.zeros_like(pw), atol=1e-7)


def _fsdp_rank(rank: int, out: str, port: int) -> None:
    """One of 2 gloo ranks training the tiny MoE under FSDP2 (bs 2 x 2 micro-batches per rank)."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_FSDP="true",
                      FSDP_VERSION="2", FSDP_TRANSFORMER_CLS_TO_WRAP="Qwen3MoeDecoderLayer")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, hist = _train_8_pairs(Path(out) / f"rank{rank}", per_device_train_batch_size=2,
                                     gradient_accumulation_steps=2)
        if rank == 0:
            torch.save({"weights": _flat(model), "aux": [h["aux_loss"] for h in hist]}, Path(out) / "fsdp.pt")
    finally:
        dist.destroy_process_group()


def _train_8_pairs(out: Path, **kw):
    pairs = _pairs(8)
    ref = compute_reference_logps(tiny_moe("qwen3_moe"), pairs, pad_id=0, batch_size=8)
    model = tiny_moe("qwen3_moe", coef=0.5)
    cfg = TrainConfig(max_steps=2, learning_rate=1e-3, seed=1, **kw)
    return model, train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=out).history


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_two_fsdp_ranks_match_one_process(tmp_path):
    """2 gloo ranks under FSDP2 (the step's router logits all-gathered, FSDP's gradient averaging
    undone) x 2 micro-batches of 2 == 1 process x 8 pairs: the same aux_loss and weights."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_rank, args=(str(tmp_path), port), nprocs=2)
    got = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    model, hist = _train_8_pairs(tmp_path / "one", per_device_train_batch_size=8)
    assert got["aux"] == pytest.approx([h["aux_loss"] for h in hist], rel=1e-6)
    assert torch.allclose(got["weights"], _flat(model), atol=1e-5)


def test_reference_passes_compute_no_router_logits(tmp_path):
    """The precompute and an online reference model run their body without output_router_logits; the
    policy's forward asks for them."""
    pairs = _pairs(4)
    calls = {"policy": [], "reference": []}

    def spy(model, who):
        model.model.register_forward_pre_hook(
            lambda mod, args, kwargs: calls[who].append(bool(kwargs.get("output_router_logits"))), with_kwargs=True)
        return model

    compute_reference_logps(spy(tiny_moe("olmoe"), "reference"), pairs, pad_id=0, batch_size=4)
    train(spy(tiny_moe("olmoe"), "policy"), pairs, spy(tiny_moe("olmoe"), "reference"), loss_cfg=LossConfig(),
          cfg=TrainConfig(max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2), pad_id=0,
          out_dir=tmp_path)
    assert calls["reference"] and not any(calls["reference"])
    assert calls["policy"] == [True] * 3  # the pre-pass of micro-batch 2, then both training forwards


def test_coefficient_for_a_model_without_router_is_a_config_error(tmp_path):
    dense = tiny_model_dir(tmp_path / "dense")
    moe = tiny_moe_dir(tmp_path / "moe")
    pairs = _pairs(4)
    from transformers import AutoModelForCausalLM

    with pytest.raises(ConfigError, match=r"train\.router_aux_loss_coef=0\.01: model .*dense \(LlamaForCausalLM\) "
                                          r"has no mixture-of-experts router"):
        train(AutoModelForCausalLM.from_pretrained(dense), pairs, None, loss_cfg=LossConfig(),
              cfg=TrainConfig(max_steps=1, router_aux_loss_coef=0.01), pad_id=0, out_dir=tmp_path / "t")
    # preflight: before any compute, from the folder's config.json or the builtin table
    for name, bad in ((dense, True), (moe, False), ("builtin:smollm2-135m-instruct", True),
                      ("builtin:tiny-qwen3-moe", False)):
        cfg = load_config(overrides={"model.name_or_path": str(name), "train.router_aux_loss_coef": 0.01})
        if bad:
            with pytest.raises(ConfigError, match=r"^config error: train\.router_aux_loss_coef=0\.01: model "):
                check_router_setting(cfg)
        else:
            check_router_setting(cfg)
    check_router_setting(load_config(overrides={"model.name_or_path": str(dense)}))  # unset: nothing to check
    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        load_config(overrides={"train.router_aux_loss_coef": -1})


def test_dpo_run_with_an_moe_model_folder(dpo_home, tmp_path):
    """`dpo run --config configs/moe-tiny.yaml` on a tiny MoE folder: five stages, aux_loss in MLflow
    every logged step, and the registered version loads back as the MoE model."""
    import json

    from data_contracts.state import mlflow_uri
    from dpo_engine import tracking
    from flows.cli import main

    folder = tiny_moe_dir(tmp_path / "moe-model", "qwen3_moe")
    sets = {"model.name_or_path": str(folder), "data.train_limit": 8, "data.eval_limit": 4,
            "train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 2, "train.max_steps": 2,
            "train.logging_steps": 1, "train.save_steps": 0, "eval.num_prompts": 2, "eval.max_new_tokens": 4,
            "registry.model_name": "tiny-moe-e2e", "registry.gate.thresholds": "{}"}
    config = Path(__file__).resolve().parents[1] / "configs" / "moe-tiny.yaml"
    assert main(["run", "--config", str(config), "--run-name", "moe",
                 *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]) == 0
    summary = json.loads((dpo_home / "runs" / "moe" / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"].values()] == ["completed"] * 5
    tracking.connect(mlflow_uri())
    from mlflow import MlflowClient

    hist = MlflowClient().get_metric_history(summary["mlflow_run_id"], "aux_loss")
    assert [m.step for m in hist] == [1, 2] and all(m.value > 0 for m in hist)
    model, _ = tracking.load_registered(f"models:/tiny-moe-e2e/{summary['registered_version']}")
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and router_of(model) is not None
