"""Issue #5: gradient checkpointing, 8-bit AdamW errors, per-step observability, periodic evaluation
and early stopping."""

import pytest
import torch
from pydantic import ValidationError

from data_contracts.config import LossConfig, TrainConfig
from dpo_engine.evaluation import preference_metrics
from dpo_engine.modeling import pair_logps
from dpo_engine.modeling import loss_from_config
from dpo_engine.reference import compute_reference_logps
from dpo_engine.training import TrainingError, should_stop, train
from test_trainer import _load, _pairs
from tiny import tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def data(tiny_dir):
    model = _load(tiny_dir)
    train_pairs, eval_pairs = _pairs(n=8, seed=0), _pairs(n=6, seed=1)
    eval_pairs["example_id"] = [f"ev{i}" for i in range(len(eval_pairs))]
    return (train_pairs, compute_reference_logps(model, train_pairs, pad_id=0, batch_size=4),
            eval_pairs, compute_reference_logps(model, eval_pairs, pad_id=0, batch_size=4))


def _cfg(**kw):
    return TrainConfig(**{"learning_rate": 1e-3, "max_steps": 4, "seed": 1, "per_device_train_batch_size": 4,
                          **kw})


def _grads(model, pairs, ref):
    model.train()
    model.zero_grad()
    fw = pair_logps(model, pairs.to_dict("records"), 0, loss_cfg=LossConfig())
    rc, rr = (torch.tensor(ref[c].values) for c in ("ref_chosen_logps", "ref_rejected_logps"))
    loss = loss_from_config(LossConfig(), fw["chosen"], fw["rejected"], rc, rr,
                            ld_weighted=fw["ld_weighted"], **fw["loss_inputs"]).losses.mean()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_dir, data, tmp_path):
    pairs, ref, _, _ = data
    plain, ckpt = _load(tiny_dir), _load(tiny_dir)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    (l0, g0), (l1, g1) = _grads(plain, pairs, ref), _grads(ckpt, pairs, ref)
    assert abs(l0 - l1) < 1e-6
    assert torch.allclose(g0, g1, atol=1e-6)
    # through the trainer: the option switches it on and the losses match the plain run
    m0, m1 = _load(tiny_dir), _load(tiny_dir)
    a = train(m0, pairs, ref, loss_cfg=LossConfig(), cfg=_cfg(max_steps=2), pad_id=0, out_dir=tmp_path / "a")
    b = train(m1, pairs, ref, loss_cfg=LossConfig(), cfg=_cfg(max_steps=2, gradient_checkpointing=True),
              pad_id=0, out_dir=tmp_path / "b")
    assert m1.is_gradient_checkpointing
    for ha, hb in zip(a.history, b.history):
        assert abs(ha["loss"] - hb["loss"]) < 1e-6 and abs(ha["grad_norm"] - hb["grad_norm"]) < 1e-6


def test_adamw_8bit_fails_clearly_without_cuda_or_bitsandbytes(tiny_dir, data, tmp_path):
    pairs, ref, _, _ = data
    with pytest.raises(TrainingError, match="train.optim: adamw_8bit"):
        train(_load(tiny_dir), pairs, ref, loss_cfg=LossConfig(), cfg=_cfg(optim="adamw_8bit"), pad_id=0,
              out_dir=tmp_path)
    with pytest.raises(ValidationError):
        TrainConfig(optim="adamw_9bit")


def test_step_metrics_memory_mfu_and_cumulative_tokens(tiny_dir, data, tmp_path):
    pairs, ref, _, _ = data
    res = train(_load(tiny_dir), pairs, ref, loss_cfg=LossConfig(), cfg=_cfg(), pad_id=0, out_dir=tmp_path / "a")
    h = res.history
    assert all(x["peak_memory_mb"] > 10 for x in h)  # process peak RSS on the CPU
    assert all("mfu" not in x for x in h)  # no known peak on a CPU
    per_step = [x["tokens_per_second"] for x in h]
    assert all(v > 0 for v in per_step)
    cum = [x["num_tokens"] for x in h]
    assert all(b > a for a, b in zip(cum, cum[1:]))
    # 2 epochs of the same 8 pairs (4 pairs per step): the cumulative count doubles after 4 steps
    assert cum[3] == 2 * cum[1]
    n_tok = sum(len(r["prompt_input_ids"]) * 2 + len(r["chosen_input_ids"]) + len(r["rejected_input_ids"])
                for r in pairs.to_dict("records"))
    assert cum[1] == n_tok

    res = train(_load(tiny_dir), pairs, ref, loss_cfg=LossConfig(), cfg=_cfg(max_steps=1, peak_tflops=1.0),
                pad_id=0, out_dir=tmp_path / "b")
    m = res.history[0]
    n_params = sum(p.numel() for p in _load(tiny_dir).parameters())
    want = 6 * n_params * (m["num_tokens"]) / (m["num_tokens"] / m["tokens_per_second"] * 1e12)
    assert m["mfu"] == pytest.approx(want, rel=1e-6)


def test_periodic_evaluation_logs_eval_metrics_at_its_steps(tiny_dir, data, tmp_path):
    pairs, ref, eval_pairs, eval_ref = data
    model = _load(tiny_dir)
    calls, logged = [], {}

    def evaluate(step):
        calls.append((step, model.training))
        return preference_metrics(model, eval_pairs, eval_ref, loss_cfg=LossConfig(), pad_id=0, batch_size=4)

    res = train(model, pairs, ref, loss_cfg=LossConfig(), cfg=_cfg(eval_steps=2, logging_steps=1), pad_id=0, out_dir=tmp_path,
                evaluate_fn=evaluate, log_fn=lambda m, s: logged.setdefault(s, m))
    assert [c[0] for c in calls] == [2, 4]
    assert model.training  # put back in train mode after each evaluation
    for h in res.history:
        has_eval = "eval/rewards/accuracies" in h and "eval/loss" in h
        assert has_eval == (h["step"] in (2, 4))
    assert "eval/rewards/margins" in logged[4] and "eval/loss" not in logged[3]
    assert res.history[1]["eval/loss"] < 0.6931  # the policy moved towards the preferred answers
    # off by default, and with no callback
    res = train(_load(tiny_dir), pairs, ref, loss_cfg=LossConfig(), cfg=_cfg(max_steps=2), pad_id=0,
                out_dir=tmp_path / "off", evaluate_fn=evaluate)
    assert len(calls) == 2 and not any(k.startswith("eval/") for h in res.history for k in h)


def test_should_stop_counts_evaluations_without_improvement():
    cfg = TrainConfig(eval_steps=1, early_stopping_metric="eval/loss", early_stopping_mode="min",
                      early_stopping_patience=2)
    hist = [{"loss": 1.0}, {"eval/loss": 0.5}, {"eval/loss": 0.4}, {"eval/loss": 0.45}]
    assert not should_stop(hist, cfg)
    assert should_stop(hist + [{"eval/loss": 0.4}], cfg)  # equal is no improvement
    assert not should_stop(hist + [{"eval/loss": 0.3}], cfg)
    assert not should_stop(hist, TrainConfig())
    with pytest.raises(ValidationError, match="eval_steps"):
        TrainConfig(early_stopping_metric="eval/loss")


def test_early_stopping_stops_keeps_the_model_and_resumes_the_decision(tiny_dir, data, tmp_path):
    pairs, ref, _, _ = data
    scores = {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.7, 5: 0.9, 6: 1.0}
    cfg = _cfg(max_steps=6, eval_steps=1, early_stopping_metric="eval/rewards/accuracies",
               early_stopping_patience=2, save_steps=1)
    model = _load(tiny_dir)
    before = [p.detach().clone() for p in model.parameters()]
    res = train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path,
                evaluate_fn=lambda s: {"rewards/accuracies": scores[s]})
    assert res.stopped_early and res.steps == 4 and len(res.history) == 4
    assert res.history[-1]["eval/rewards/accuracies"] == 0.7
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # trained weights kept
    # the stop step is checkpointed: a re-run resumes there and keeps the decision (no more steps)
    res2 = train(_load(tiny_dir), pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path,
                 evaluate_fn=lambda s: {"rewards/accuracies": scores[s]})
    assert res2.resumed_from == 4 and res2.stopped_early and res2.steps == 4
    # killed before that checkpoint (only step 3's left): the re-run reaches the same decision at step 4
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "step-4")
    res3 = train(_load(tiny_dir), pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path,
                 evaluate_fn=lambda s: {"rewards/accuracies": scores[s]})
    assert res3.resumed_from == 3 and res3.stopped_early and res3.steps == 4
