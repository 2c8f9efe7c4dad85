"""The five pipeline stages as plain functions: ``key(cfg, ...)`` gives a content fingerprint, and
``run(cfg, run_dir, ...)`` does the work (or reuses an earlier run's outputs with the same
fingerprint) and returns a JSON-able result dict. Their order and inputs are one table
(:mod:`dpo_engine.stages.table`); Prefect tasks, the flow and the CLI all read it."""

from dpo_engine.stages import evaluate, precompute, register, train, validate

__all__ = ["validate", "precompute", "train", "evaluate", "register"]
