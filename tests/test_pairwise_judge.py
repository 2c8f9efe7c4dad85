"""Pairwise judges (``eval.judge: "pairwise:..."``): both orders cancel position bias, the disagreement
rate, a reward model as a pairwise judge, and pointwise judges as before."""

import json
import math

import pandas as pd
import pytest
import torch

from dpo_engine.evaluation import (EvaluationError, PairwiseJudge, ScorePairwise, judge_table, load_judge, plots,
                                   win_rate_summary)
from dpo_engine.pipeline import summary_table
from test_reward_judge import reward_dir  # noqa: F401 (the tiny reward model fixture)


def always_first(prompt, response_a, response_b, row):
    """A judge with nothing but position bias: the response it reads first always wins."""
    return 1.0


def slightly_biased(prompt, response_a, response_b, row):
    """Quality (the word 'good') decides, plus a 0.1 preference for position a."""
    quality = lambda r: 1.0 if "good" in r else 0.0
    return 0.5 + 0.1 + 0.15 * (quality(response_a) - quality(response_b))


def out_of_range(prompt, response_a, response_b, row):
    return 1.7


def pointwise(prompt, response, row):
    return float(len(response))


def _rows(n):
    return [{"example_id": f"e{i}", "prompt": json.dumps(f"question {i}"), "meta": "{}"} for i in range(n)]


def test_always_first_judge_cancels_to_half_with_full_disagreement():
    judge = load_judge("pairwise:test_pairwise_judge:always_first")
    assert isinstance(judge, PairwiseJudge)
    table, m = judge_table(_rows(6), ["good answer"] * 6, ["bad"] * 6, judge)
    assert table["p_policy_first"].tolist() == [1.0] * 6 and table["p_reference_first"].tolist() == [1.0] * 6
    assert table["win"].tolist() == [0.5] * 6  # each prompt: mean(1, 1 - 1)
    assert m["eval/win_rate"] == 0.5 and m["eval/win_rate_ci_low"] == m["eval/win_rate_ci_high"] == 0.5
    assert m["eval/judge_disagreement"] == 1.0
    assert m["eval/lc_win_rate"] == pytest.approx(0.5, abs=1e-9)
    assert "eval/policy_score" not in m  # no pointwise scores from a pairwise judge


def test_both_orders_are_averaged_and_disagreements_counted():
    judge = load_judge("pairwise:test_pairwise_judge:slightly_biased")
    policy = ["good one", "good two", "plain", "plain"]
    reference = ["plain", "plain", "plain", "plain"]
    table, m = judge_table(_rows(4), policy, reference, judge)
    # policy better: P = 0.75 policy first, 0.45 reference first -> both orders pick the policy
    assert table.loc[0, "p_policy_first"] == pytest.approx(0.75)
    assert table.loc[0, "p_reference_first"] == pytest.approx(0.45)
    assert table.loc[0, "win"] == pytest.approx((0.75 + 1 - 0.45) / 2)
    assert not table.loc[0, "disagree"]
    # equal quality: 0.6 both ways -> the first one wins each time: the orders disagree, judgement 0.5
    assert table.loc[2, "win"] == pytest.approx(0.5) and table.loc[2, "disagree"]
    assert m["eval/win_rate"] == pytest.approx((0.65 * 2 + 0.5 * 2) / 4)
    assert m["eval/judge_disagreement"] == 0.5


def test_pairwise_spec_errors():
    judge = load_judge("pairwise:test_pairwise_judge:out_of_range")
    with pytest.raises(EvaluationError, match=r"returned 1\.7 for example 'e0'.*\[0, 1\]"):
        judge_table(_rows(1), ["a"], ["b"], judge)
    with pytest.raises(EvaluationError, match="pairwise:package.module:function"):
        load_judge("pairwise:nocolon")
    with pytest.raises(EvaluationError, match="needs a folder"):
        load_judge("pairwise:reward_model:")
    # the wrong kind of function for the spec: one line saying how to name it
    with pytest.raises(EvaluationError, match="pointwise judge is named without the prefix"):
        load_judge("pairwise:test_pairwise_judge:pointwise")
    with pytest.raises(EvaluationError, match="pairwise judge is named 'pairwise:test_pairwise_judge:always_first'"):
        load_judge("test_pairwise_judge:always_first")


def test_pointwise_judge_unchanged():
    judge = load_judge("data_contracts.builtin:judge")
    rows = [{"example_id": f"e{i}", "prompt": json.dumps("q"), "meta": json.dumps({"answer": "4"})} for i in range(3)]
    table, m = judge_table(rows, ["Answer: 4", "Answer: 4", "Answer: 5"], ["4", "Answer: 4", "Answer: 4"], judge)
    assert table["win"].tolist() == [1.0, 0.5, 0.0]
    assert table["policy_score"].tolist() == [1.0, 1.0, 0.5]
    assert m["eval/win_rate"] == 0.5 and m["eval/policy_score"] == pytest.approx(2.5 / 3)
    assert "eval/judge_disagreement" not in m and "eval/lc_win_rate" in m
    assert "judge score policy 0.83 vs reference 0.67, win-rate 0.50" in win_rate_summary(m)


def test_score_pairwise_scores_each_response_once():
    calls = []

    def scorer(prompt, response, row):
        calls.append(response)
        return {"long answer": 2.0, "short": 0.5}[response]

    judge = ScorePairwise(scorer)
    assert judge("q", "long answer", "short", {}) == pytest.approx(1 / (1 + math.exp(-1.5)))
    assert judge("q", "short", "long answer", {}) == pytest.approx(1 / (1 + math.exp(1.5)))
    assert sorted(calls) == ["long answer", "short"]  # the second order reused both scores
    assert ScorePairwise(lambda p, r, row: 1e6 if r == "a" else -1e6)("q", "a", "b", {}) == 1.0  # no overflow


def test_reward_model_as_pairwise_judge(reward_dir):
    path, model, tok = reward_dir
    judge = load_judge(f"pairwise:reward_model:{path}")
    prompt = [{"role": "user", "content": "Say hi"}]

    def score(response):
        text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        with torch.no_grad():
            return model(**tok(text, return_tensors="pt")).logits[0, 0].item()

    want = 1 / (1 + math.exp(-(score("Hi!") - score("Go away."))))
    assert judge(prompt, "Hi!", "Go away.", {}) == pytest.approx(want, abs=1e-5)
    rows = [{"example_id": "a", "prompt": json.dumps(prompt), "meta": "{}"},
            {"example_id": "b", "prompt": json.dumps(prompt), "meta": "{}"}]
    table, m = judge_table(rows, ["Hi!", "Go away."], ["Go away.", "Hi!"], judge)
    assert table.loc[0, "win"] == pytest.approx(want, abs=1e-5)  # no position bias: both orders agree
    assert table.loc[0, "p_reference_first"] == pytest.approx(1 - want, abs=1e-5)
    assert m["eval/win_rate"] == pytest.approx(0.5, abs=1e-6)  # the same two responses, swapped
    assert m["eval/judge_disagreement"] == 0.0


def test_pairwise_summary_table_and_plot(tmp_path):
    judge = load_judge("pairwise:test_pairwise_judge:slightly_biased")
    table, m = judge_table(_rows(8), ["good and longer answer"] * 6 + ["plain"] * 2, ["plain"] * 8, judge)
    line = win_rate_summary(m)
    assert line.startswith(f"win-rate {m['eval/win_rate']:.2f} [") and "length-controlled" in line
    assert line.endswith("judge order disagreement 0.25")
    text = summary_table({"stages": {"evaluate": {"metrics": m}}})
    assert "length-controlled win-rate" in text and "judge order disagreement" in text
    assert f"length-controlled win-rate 95% CI: [{m['eval/lc_win_rate_ci_low']:.3f}" in text
    png = plots.eval_scores(table, m, tmp_path / "e.png")
    assert png.read_bytes().startswith(b"\x89PNG")
    assert plots.eval_scores(pd.DataFrame({"prompt": ["x"]}), {}, tmp_path / "none.png") is None
