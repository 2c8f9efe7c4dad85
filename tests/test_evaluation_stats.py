"""Evaluation statistics: the KL estimate on the policy's own samples, its sampling settings,
response-length statistics and the bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from data_contracts.config import EvalConfig
from dpo_engine.evaluation import bootstrap_ci, generate, kl_metrics, kl_sampling, length_metrics, sample_kl
from tiny import tiny_model_dir, tiny_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kl")
    load = lambda seed: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        tiny_model_dir(root / f"m{seed}", seed=seed), use_safetensors=True).eval()
    return load(0), load(1), tiny_tokenizer()


def test_kl_estimate_matches_the_exact_kl_of_one_token(models):
    """With one new token the sequence KL is the KL of the next-token distributions, computable
    exactly from the logits; the Monte-Carlo mean over the policy's samples must match it (within 4
    standard errors), and must not match it with greedy outputs."""
    policy, reference, tok = models
    prompt = tok("ab", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(policy(torch.tensor([prompt])).logits[0, -1].double(), -1)
        lr = torch.log_softmax(reference(torch.tensor([prompt])).logits[0, -1].double(), -1)
    exact = float((lp.exp() * (lp - lr)).sum())
    assert exact > 0.01
    n = 3000
    cfg = EvalConfig(batch_size=500, max_new_tokens=1, do_sample=True, seed=3)
    samples = generate(policy, tok, [prompt] * n, cfg)
    diffs = sample_kl(policy, reference, [prompt] * n, samples, eos_id=tok.eos_token_id,
                      pad_id=tok.pad_token_id, batch_size=500, max_new_tokens=1)
    assert diffs.shape == (n,)
    stderr = diffs.std() / np.sqrt(n)
    assert abs(diffs.mean() - exact) < 4 * stderr, (diffs.mean(), exact, stderr)
    m = kl_metrics(diffs)
    assert m["eval/kl_policy_reference_ci_low"] < exact < m["eval/kl_policy_reference_ci_high"]
    # the policy scored against itself: exactly zero
    same = sample_kl(policy, policy, [prompt] * 8, samples[:8], eos_id=tok.eos_token_id,
                     pad_id=tok.pad_token_id, batch_size=8, max_new_tokens=1)
    assert np.abs(same).max() < 1e-6


def test_kl_draws_its_own_samples_unless_generations_are_pure_samples():
    assert kl_sampling(EvalConfig(do_sample=True)) is None
    for cfg in (EvalConfig(), EvalConfig(do_sample=True, temperature=0.7),
                EvalConfig(do_sample=True, top_p=0.9)):
        own = kl_sampling(cfg)
        assert own is not None and own.do_sample and own.temperature == 1.0 and own.top_p == 1.0
        assert own.max_new_tokens == cfg.max_new_tokens and own.seed == cfg.seed


def test_length_metrics():
    m = length_metrics("policy", [[1, 2, 3], [4], [5, 6, 7, 8]], max_new_tokens=4)
    assert m == {"eval/policy_response_tokens": pytest.approx(8 / 3),
                 "eval/policy_response_tokens_median": 3.0, "eval/policy_response_tokens_max": 4.0,
                 "eval/policy_response_truncated": pytest.approx(1 / 3)}
    assert length_metrics("policy", [], 4) == {}


def test_bootstrap_interval_covers_the_mean_at_about_95_percent():
    """Percentile bootstrap of a Bernoulli(0.7) mean over 200 draws: the interval has about the
    normal-theory width and covers the true mean in about 95% of repeats."""
    rng = np.random.default_rng(0)
    hits, widths = 0, []
    for rep in range(200):
        x = (rng.random(200) < 0.7).astype(float)
        lo, hi = bootstrap_ci(x, n=1000, seed=rep)
        hits += lo <= 0.7 <= hi
        widths.append(hi - lo)
    assert 0.90 <= hits / 200 <= 0.99
    assert np.mean(widths) == pytest.approx(2 * 1.96 * np.sqrt(0.21 / 200), rel=0.1)
    assert all(np.isnan(bootstrap_ci(np.zeros(0))))
