"""Length-controlled win-rate: a logistic regression of the judgement on the length difference, its
prediction at equal length, a seeded bootstrap interval over prompts."""

import json
import math

import numpy as np
import pytest

from dpo_engine.evaluation import judge_table, length_controlled, load_judge
from dpo_engine.evaluation.length_control import fit_logistic
from dpo_engine.pipeline import summary_table


def prefers_longer(prompt, response_a, response_b, row):
    """A judge that only looks at length: P(a better) = sigmoid((len a - len b) / 20)."""
    return 1 / (1 + math.exp(-(len(response_a) - len(response_b)) / 20))


def _longer_wins(n=300, seed=1):
    """The policy mostly longer; the judge prefers the longer answer, at equal length a coin flip."""
    rng = np.random.default_rng(seed)
    ref = rng.integers(20, 200, n).astype(float)
    d = rng.normal(40, 50, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-3 * np.tanh(d / d.std(ddof=1))))).astype(float)
    return y, ref + d, ref


def _inside(m):
    return m["eval/lc_win_rate_ci_low"] <= m["eval/lc_win_rate"] <= m["eval/lc_win_rate_ci_high"]


def test_win_by_length_is_controlled_away():
    y, pol, ref = _longer_wins()
    m = length_controlled(y, pol, ref, seed=0)
    assert y.mean() > 0.7  # the raw win-rate is high ...
    assert m["eval/lc_win_rate"] == pytest.approx(0.5, abs=0.12)  # ... at equal length, a coin flip
    assert m["eval/lc_win_rate_ci_low"] < 0.5 < m["eval/lc_win_rate_ci_high"] and _inside(m)
    assert m["eval/length_coef"] > 1.5 and m["eval/mean_length_diff"] == pytest.approx((pol - ref).mean())


def test_length_loving_pairwise_judge_end_to_end():
    rng = np.random.default_rng(3)
    rows = [{"example_id": f"e{i}", "prompt": json.dumps("q"), "meta": "{}"} for i in range(60)]
    ref = ["x" * int(n) for n in rng.integers(40, 120, 60)]
    # the policy answers 25 characters longer on average (shorter on some prompts)
    pol = [r[:len(r) + k] if k < 0 else r + "y" * k for r, k in zip(ref, rng.normal(25, 30, 60).astype(int))]
    _, m = judge_table(rows, pol, ref, load_judge("pairwise:test_length_control:prefers_longer"), seed=0)
    assert m["eval/win_rate"] > 0.65 and m["eval/win_rate_ci_low"] > 0.55 and m["eval/judge_disagreement"] == 0.0
    assert m["eval/lc_win_rate"] == pytest.approx(0.5, abs=0.05) and m["eval/length_coef"] > 1.5
    assert m["eval/mean_length_diff"] > 15 and _inside(m)


def test_no_length_effect_keeps_the_raw_win_rate():
    rng = np.random.default_rng(2)
    y = (rng.random(400) < 0.7).astype(float)
    ref = rng.integers(20, 200, 400).astype(float)
    m = length_controlled(y, ref + rng.normal(40, 40, 400), ref, seed=0)
    assert m["eval/lc_win_rate"] == pytest.approx(y.mean(), abs=0.05) and _inside(m)
    assert abs(m["eval/length_coef"]) < 0.5
    # equal lengths: only the intercept, the LC win-rate is the raw one (up to the tiny L2 penalty)
    same = length_controlled(y[:32], ref[:32], ref[:32], seed=0)
    assert same["eval/lc_win_rate"] == pytest.approx(y[:32].mean(), abs=1e-3)
    assert same["eval/length_coef"] == 0.0 and same["eval/mean_length_diff"] == 0.0


def test_separable_data_stays_finite():
    lengths = np.arange(32.0)
    every = length_controlled(np.ones(32), lengths + 10, lengths, seed=0)  # every prompt won
    assert all(math.isfinite(v) for v in every.values()) and every["eval/lc_win_rate"] > 0.99
    d = np.random.default_rng(0).normal(0, 30, 32)
    by_length = length_controlled((d > 0).astype(float), 100 + d, np.full(32, 100.0), seed=0)  # won iff longer
    assert all(math.isfinite(v) for v in by_length.values()) and by_length["eval/length_coef"] > 5
    assert 0.0 < by_length["eval/lc_win_rate_ci_low"] <= by_length["eval/lc_win_rate_ci_high"] < 1.0
    assert length_controlled(np.array([]), np.array([]), np.array([])) == {}


def test_seeded_and_deterministic():
    y, pol, ref = _longer_wins(n=64)
    a, b = length_controlled(y, pol, ref, seed=7), length_controlled(y, pol, ref, seed=7)
    assert a == b
    other = length_controlled(y, pol, ref, seed=8)
    assert other["eval/lc_win_rate"] == a["eval/lc_win_rate"]  # the point estimate does not resample
    assert other["eval/lc_win_rate_ci_low"] != a["eval/lc_win_rate_ci_low"]


def test_newton_fit_matches_the_closed_form():
    # one binary feature: the maximum-likelihood fit is logit of each group's mean (fractional targets too)
    x1 = np.array([0.0] * 5 + [1.0] * 5)
    y = np.array([1, 0, 0, 1, 0.5, 1, 1, 1, 0, 0.75])
    w = fit_logistic(np.stack([np.ones(10), x1], axis=-1), y, l2=0.0)
    logit = lambda p: math.log(p / (1 - p))
    assert w[0] == pytest.approx(logit(2.5 / 5), abs=1e-8)
    assert w[1] == pytest.approx(logit(3.75 / 5) - logit(2.5 / 5), abs=1e-8)
    batched = fit_logistic(np.stack([np.stack([np.ones(10), x1], -1)] * 3), np.stack([y, y, 1 - y]), l2=0.0)
    assert batched[0] == pytest.approx(w) and batched[2] == pytest.approx(-w)


def test_summary_table_shows_raw_and_length_controlled():
    y, pol, ref = _longer_wins(n=64)
    m = {"eval/win_rate": 0.8, "eval/win_rate_ci_low": 0.7, "eval/win_rate_ci_high": 0.9,
         **length_controlled(y, pol, ref)}
    text = summary_table({"stages": {"evaluate": {"metrics": m}}})
    assert "win-rate 95% CI: [0.700, 0.900]" in text
    assert f"length-controlled win-rate{m['eval/lc_win_rate']:>12.3f}" in text  # name padded to 28
    assert f"length-controlled win-rate 95% CI: [{m['eval/lc_win_rate_ci_low']:.3f}, " in text
    assert "length coefficient" in text
