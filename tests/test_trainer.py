import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from data_contracts.config import LossConfig, TrainConfig
from dpo_engine.modeling import pair_batch, sequence_logps
from dpo_engine.reference import compute_reference_logps, read_cache, write_cache
from dpo_engine.training import train
from tiny import tiny_model_dir


def _pairs(n=8, seed=0, vocab=90):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        p = torch.randint(5, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        c = torch.randint(5, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist() + [2]
        r = torch.randint(5, vocab, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist() + [2]
        rows.append({"example_id": f"ex{i}", "prompt_input_ids": p, "chosen_input_ids": c,
                     "rejected_input_ids": r})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m")


def _load(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def _ref(model, pairs):
    return compute_reference_logps(model, pairs, pad_id=0, batch_size=5)


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _train(d, pairs, ref, tmp, loss=None, **kw):
    model = _load(d)
    cfg = TrainConfig(**{"learning_rate": 1e-3, "max_steps": 3, "seed": 1, **kw})
    res = train(model, pairs, ref, loss_cfg=loss or LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp)
    return model, res


def test_reference_logps_match_unsorted_batch_and_first_step_is_ln2(tiny_dir, tmp_path):
    pairs = _pairs()
    model = _load(tiny_dir)
    ref = _ref(model, pairs)
    with torch.no_grad():
        out = sequence_logps(model, pair_batch(pairs.to_dict("records"), 0))
    assert torch.allclose(out["logps"][:8].double(), torch.tensor(ref["ref_chosen_logps"].values), atol=1e-5)
    assert torch.allclose(out["logps"][8:].double(), torch.tensor(ref["ref_rejected_logps"].values), atol=1e-5)
    _, res = _train(tiny_dir, pairs, ref, tmp_path, max_steps=1, per_device_train_batch_size=8)
    assert abs(res.history[0]["loss"] - 0.693147) < 1e-5


@pytest.mark.parametrize("loss", [LossConfig(), LossConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0]),
                                  LossConfig(loss_type="orpo")], ids=["sigmoid", "rpo", "orpo"])
def test_gradient_accumulation_is_exact(tiny_dir, tmp_path, loss):
    """8 pairs x 1 micro-batch == 1 pair x 8 micro-batches after 5 steps, also for losses with a
    token-mean SFT term (normalised by the whole step's chosen tokens, not each micro-batch's)."""
    pairs = _pairs()
    ref = _ref(_load(tiny_dir), pairs)
    a, ra = _train(tiny_dir, pairs, ref, tmp_path / "a", loss, max_steps=5, per_device_train_batch_size=8)
    b, rb = _train(tiny_dir, pairs, ref, tmp_path / "b", loss, max_steps=5, per_device_train_batch_size=1,
                   gradient_accumulation_steps=8)
    c, _ = _train(tiny_dir, pairs, ref, tmp_path / "c", loss, max_steps=5, per_device_train_batch_size=8)
    assert not torch.allclose(_weights(a), _weights(_load(tiny_dir)), atol=1e-3)  # it trained
    assert torch.allclose(_weights(a), _weights(b), atol=1e-5)
    assert [h["loss"] for h in ra.history] == pytest.approx([h["loss"] for h in rb.history], abs=1e-5)
    assert torch.equal(_weights(a), _weights(c))  # deterministic: bitwise identical


def test_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_checkpoint(tiny_dir, tmp_path):
    from dpo_engine.training import TrainingError

    pairs = _pairs()
    ref = _ref(_load(tiny_dir), pairs)
    bad = ref.copy()
    n_steps_ok = 2  # batch 2, seeded order: find a pair first used in step 3, poison its reference
    cfg = TrainConfig(learning_rate=1e-3, max_steps=4, seed=1, save_steps=1, per_device_train_batch_size=2)
    from dpo_engine.training import pair_order
    order = pair_order(len(pairs), 8, cfg.seed)
    poisoned = next(i for i in order[4:6] if i not in order[:4])
    bad.loc[bad["example_id"] == pairs["example_id"][poisoned], "ref_chosen_logps"] = float("nan")
    model = _load(tiny_dir)
    with pytest.raises(TrainingError, match="non-finite loss/gradient at step 3") as e:
        train(model, pairs, bad, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path)
    assert str(tmp_path / "checkpoints" / f"step-{n_steps_ok}") in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-1", "step-2"]
    with pytest.raises(TrainingError, match="no checkpoint was written"):  # save_steps=0: said so
        train(_load(tiny_dir), pairs, bad, loss_cfg=LossConfig(), cfg=cfg.model_copy(update={"save_steps": 0}),
              pad_id=0, out_dir=tmp_path / "none")


def test_checkpoint_at_the_end_and_keep_the_last_k(tiny_dir, tmp_path):
    pairs = _pairs()
    ref = _ref(_load(tiny_dir), pairs)
    model, res = _train(tiny_dir, pairs, ref, tmp_path / "end", max_steps=3)  # save_steps=0: at the end only
    assert [p.name for p in (tmp_path / "end" / "checkpoints").glob("step-*")] == ["step-3"]
    again, res2 = _train(tiny_dir, pairs, ref, tmp_path / "end", max_steps=3)  # a finished run re-run
    assert res2.resumed_from == 3 and torch.equal(_weights(again), _weights(model))
    (tmp_path / "k" / "checkpoints" / ".step-9.tmp999999999").mkdir(parents=True)  # a killed save's leftover
    _train(tiny_dir, pairs, ref, tmp_path / "k", max_steps=5, save_steps=1, save_total_limit=3)
    assert sorted(p.name for p in (tmp_path / "k" / "checkpoints").glob("step-*")) == ["step-3", "step-4", "step-5"]


def test_logging_steps_average_like_trl():
    from dpo_engine.training import logged_metrics

    hist = [{"step": s, "loss": float(s), "num_tokens": 10.0 * s} for s in range(1, 8)]
    hist[5]["eval/loss"] = 0.5
    assert logged_metrics(hist[:3], 3) == {"loss": 2.0, "num_tokens": 30.0}
    assert logged_metrics(hist[:6], 3) == {"loss": 5.0, "num_tokens": 60.0, "eval/loss": 0.5}
    assert logged_metrics(hist, 3) == {"loss": 7.0, "num_tokens": 70.0}  # the last step alone
    assert logged_metrics(hist[:2], 1) == {"loss": 2.0, "num_tokens": 20.0}


def test_dropout_is_disabled_for_a_model_passed_in(tiny_dir, tmp_path):
    pairs = _pairs()
    ref = _ref(_load(tiny_dir), pairs)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attention_dropout=0.5)
    train(model, pairs, ref, loss_cfg=LossConfig(), cfg=TrainConfig(max_steps=1), pad_id=0, out_dir=tmp_path)
    assert model.config.attention_dropout == 0.0
    kept = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attention_dropout=0.5)
    train(kept, pairs, ref, loss_cfg=LossConfig(), cfg=TrainConfig(max_steps=1, disable_dropout=False), pad_id=0,
          out_dir=tmp_path / "kept")
    assert kept.config.attention_dropout == 0.5


def test_resume_after_crash_gives_the_same_weights(tiny_dir, tmp_path):
    pairs = _pairs()
    ref = _ref(_load(tiny_dir), pairs)
    full, _ = _train(tiny_dir, pairs, ref, tmp_path / "full", max_steps=4, save_steps=1,
                     per_device_train_batch_size=2)

    def crash(step, metrics):
        if step == 3:
            raise KeyboardInterrupt("simulated crash")

    model = _load(tiny_dir)
    cfg = TrainConfig(learning_rate=1e-3, max_steps=4, seed=1, save_steps=1, per_device_train_batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "crash",
              progress=crash)
    model = _load(tiny_dir)
    res = train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "crash")
    assert res.resumed_from == 2
    assert torch.equal(_weights(model), _weights(full))


def test_cache_roundtrip_and_verification(tiny_dir, tmp_path):
    from dpo_engine.reference import CacheError

    pairs = _pairs()
    ref = _ref(_load(tiny_dir), pairs)
    write_cache(ref, tmp_path / "r.parquet", {"key": "k1"})
    back = read_cache(tmp_path / "r.parquet", expect_ids=pairs["example_id"].tolist(), expect_key="k1")
    assert back["ref_chosen_logps"].tolist() == ref["ref_chosen_logps"].tolist()
    with pytest.raises(CacheError):
        read_cache(tmp_path / "r.parquet", expect_key="other")
    with pytest.raises(CacheError):
        read_cache(tmp_path / "r.parquet", expect_ids=pairs["example_id"].tolist() + ["new"])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(CacheError):
        read_cache(tmp_path / "bad.parquet")


def test_shared_cache_hits_resumes_and_rebuilds(tiny_dir, tmp_path):
    from dpo_engine.reference import cached_reference_logps

    pairs = _pairs(n=10)
    model = _load(tiny_dir)
    calls = []

    def compute(part):
        calls.append(len(part))
        if len(calls) == 2 and crash["on"]:
            raise RuntimeError("killed mid-precompute")
        return compute_reference_logps(model, part, pad_id=0, batch_size=4)

    crash = {"on": True}
    with pytest.raises(RuntimeError):
        cached_reference_logps(tmp_path, "k", pairs, {}, compute, shard_size=4, log=lambda m: None)
    crash["on"] = False
    calls.clear()
    df, stats = cached_reference_logps(tmp_path, "k", pairs, {}, compute, shard_size=4, log=lambda m: None)
    assert calls == [4, 2] and stats["computed_examples"] == 6  # the finished first shard was kept
    assert df["example_id"].tolist() == pairs["example_id"].tolist()
    want = compute_reference_logps(model, pairs, pad_id=0, batch_size=3)
    assert torch.allclose(torch.tensor(df["ref_chosen_logps"].values), torch.tensor(want["ref_chosen_logps"].values), atol=1e-5)

    calls.clear()
    _, stats = cached_reference_logps(tmp_path, "k", pairs, {}, compute, shard_size=4, log=lambda m: None)
    assert calls == [] and stats["computed_examples"] == 0  # a hit: zero forward passes

    (tmp_path / "k" / "part-00001.parquet").write_bytes(b"garbage")  # a damaged shard
    messages = []
    _, stats = cached_reference_logps(tmp_path, "k", pairs, {}, compute, shard_size=4, log=messages.append)
    assert calls == [4] and stats["computed_examples"] == 4
    assert any("part-00001" in m for m in messages)


def test_wpo_weight_and_ld_weighting_match_naive_logits(tiny_dir):
    from data_contracts.config import LossConfig
    from dpo_engine.modeling import pair_logps

    pairs = _pairs(n=4).to_dict("records")
    model = _load(tiny_dir)
    cfg = LossConfig(use_weighting=True, ld_alpha=0.5)
    with torch.no_grad():
        fw = pair_logps(model, pairs, 0, loss_cfg=cfg, with_stats=True)
        batch = fw["batch"]
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    logp = logits.log_softmax(-1)
    tok = logp.gather(2, batch.targets[..., None]).squeeze(-1)
    lsp2 = torch.logsumexp(2 * logits, -1) - 2 * torch.logsumexp(logits, -1)
    b = len(pairs)
    for s in range(2 * b):
        m = batch.predict_mask[s]
        lp, l2 = tok[s][m], lsp2[s][m]
        want_w = (lp - l2).mean()
        row = pairs[s % b]
        k = min(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))
        want_ld = lp[:k].sum() + 0.5 * lp[k:].sum()
        got_w = fw["loss_inputs"]["chosen_log_weight" if s < b else "rejected_log_weight"][s % b]
        got_ld = (fw["chosen"] if s < b else fw["rejected"])[s % b]
        assert abs(got_w.item() - want_w.item()) < 1e-4
        assert abs(got_ld.item() - want_ld.item()) < 1e-4


def test_training_runs_with_ld_dpo_and_wpo(tiny_dir, tmp_path):
    pairs = _pairs()
    model = _load(tiny_dir)
    ref = compute_reference_logps(model, pairs, pad_id=0, batch_size=5, ld_alpha=0.5)
    res = train(_load(tiny_dir), pairs, ref, loss_cfg=LossConfig(ld_alpha=0.5, use_weighting=True),
                cfg=TrainConfig(learning_rate=1e-3, max_steps=2, per_device_train_batch_size=4),
                pad_id=0, out_dir=tmp_path)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    # LD-weighted policy == LD-weighted reference at step 1, so the margins start at zero
    assert abs(res.history[0]["rewards/margins"]) < 1e-5


def test_step_metrics_match_naive_logits(tiny_dir, tmp_path):
    """TRL's token-level metrics at step 1 (before any update) from full logits: mean_token_accuracy
    (argmax == target over chosen completion tokens), entropy, logits/chosen."""
    pairs = _pairs()
    # chosen completions that repeat the prompt's last token: a tied-embedding model often predicts
    # its input token, so some (not all) chosen tokens are argmaxes
    pairs["chosen_input_ids"] = [[p[-1]] * 3 + c for p, c in zip(pairs["prompt_input_ids"], pairs["chosen_input_ids"])]
    ref = _ref(_load(tiny_dir), pairs)
    model = _load(tiny_dir)
    batch = pair_batch(pairs.to_dict("records"), 0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits.double()
    chosen = batch.predict_mask.clone()
    chosen[8:] = False
    logp = logits.log_softmax(-1)
    acc = (logits.argmax(-1) == batch.targets)[chosen].double().mean().item()
    ent = -(logp.exp() * logp).sum(-1)[batch.predict_mask].mean().item()
    _, res = _train(tiny_dir, pairs, ref, tmp_path, max_steps=1, per_device_train_batch_size=4,
                    gradient_accumulation_steps=2)
    h = res.history[0]
    assert 0 < acc < 1 and h["mean_token_accuracy"] == pytest.approx(acc, abs=1e-9)
    assert h["entropy"] == pytest.approx(ent, rel=1e-5)
    assert h["logits/chosen"] == pytest.approx(logits.mean(-1)[chosen].mean().item(), rel=1e-5)
