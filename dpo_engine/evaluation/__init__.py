"""Evaluation of a policy against its reference: held-out preference metrics
(:mod:`~dpo_engine.evaluation.preference`), generations (:mod:`~dpo_engine.evaluation.generation`),
judges and win-rates (:mod:`~dpo_engine.evaluation.judges`; pairwise judges in
:mod:`~dpo_engine.evaluation.pairwise`, the length-controlled win-rate in
:mod:`~dpo_engine.evaluation.length_control`), statistics (:mod:`~dpo_engine.evaluation.statistics`)
and plots (:mod:`~dpo_engine.evaluation.plots`)."""

from dpo_engine.evaluation import plots
from dpo_engine.evaluation.generation import generate, kl_sampling, sample_kl
from dpo_engine.evaluation.judges import (EvaluationError, Judge, PairwiseJudge, RewardModelJudge, judge_table,
                                          load_judge, win_rate_summary)
from dpo_engine.evaluation.length_control import length_controlled
from dpo_engine.evaluation.pairwise import ScorePairwise, both_orders
from dpo_engine.evaluation.preference import preference_metrics
from dpo_engine.evaluation.statistics import bootstrap_ci, kl_metrics, length_metrics

__all__ = ["plots", "generate", "kl_sampling", "sample_kl", "EvaluationError", "Judge", "PairwiseJudge",
           "RewardModelJudge", "judge_table", "load_judge", "length_controlled", "ScorePairwise", "both_orders",
           "win_rate_summary", "preference_metrics", "bootstrap_ci", "kl_metrics", "length_metrics"]
