"""Pairwise judging: ``judge(prompt, response_a, response_b, row) -> P(a better)`` in [0, 1], the form
LLM-as-judge and PairRM-style rankers take.

A pairwise judge often prefers whichever response it reads first (position bias). Each prompt is
therefore judged in both orders, policy first and reference first; the judgement is the mean of
P(policy better | policy first) and 1 - P(reference better | reference first), so a judge that always
prefers position a gives 0.5 (no preference) instead of a win for whichever side it saw first. When
the two orders name different winners the prompt counts as a disagreement; the share of such prompts
measures how much the judge's verdicts depend on the order.

A pointwise scorer (a reward model) is a pairwise judge too, through a Bradley-Terry link:
P(a better) = sigmoid(score(a) - score(b)) (:class:`ScorePairwise`); it has no position bias by
construction (its two orders always agree).
"""

from __future__ import annotations

import json
import math
from typing import Callable

PairwiseFn = Callable[[object, str, str, dict], float]


class ScorePairwise:
    """A pointwise judge ``scorer(prompt, response, row) -> float`` as a pairwise judge:
    P(a better) = sigmoid(score(a) - score(b)). The last few scores are kept, so judging the
    second order of a prompt scores nothing again (a reward model's forward pass each)."""

    def __init__(self, scorer: Callable[[object, str, dict], float], keep: int = 8):
        self.scorer, self.keep, self._scores = scorer, keep, {}

    def score(self, prompt, response: str, row: dict) -> float:
        key = json.dumps([prompt, response, row], sort_keys=True, default=str)
        if key not in self._scores:
            if len(self._scores) >= self.keep:
                self._scores.clear()
            self._scores[key] = float(self.scorer(prompt, response, row))
        return self._scores[key]

    def __call__(self, prompt, response_a: str, response_b: str, row: dict) -> float:
        diff = self.score(prompt, response_a, row) - self.score(prompt, response_b, row)
        return 0.5 * (1.0 + math.tanh(0.5 * diff))  # sigmoid(diff), without overflow


def both_orders(judge: PairwiseFn, prompt, policy: str, reference: str, row: dict) -> dict:
    """One prompt judged in both orders: ``p_policy_first`` = P(policy better | policy shown as a),
    ``p_reference_first`` = P(reference better | reference shown as a), the position-bias-cancelled
    ``win`` (P(policy better), their mean) and whether the two orders ``disagree`` on the winner."""
    p_pol = float(judge(prompt, policy, reference, row))
    p_ref = float(judge(prompt, reference, policy, row))
    return {"p_policy_first": p_pol, "p_reference_first": p_ref, "win": 0.5 * (p_pol + 1.0 - p_ref),
            "disagree": _winner(p_pol) != -_winner(p_ref)}


def _winner(p_first: float) -> int:
    """+1: the response shown first wins, -1: the second one, 0: a tie."""
    return (p_first > 0.5) - (p_first < 0.5)
