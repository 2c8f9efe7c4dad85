from dpo_engine.evaluation.metrics import (EvaluationError, bootstrap_ci, generate, judge_table, kl_metrics, kl_sampling, length_metrics, load_judge, preference_metrics, sample_kl)
