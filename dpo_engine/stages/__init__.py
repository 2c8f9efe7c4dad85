"""The five pipeline stages as plain functions: ``key(cfg, ...)`` gives a content fingerprint, and
``run(cfg, run_dir, ...)`` does the work (or reuses an earlier run's outputs with the same
fingerprint) and returns a JSON-able result dict. Prefect tasks and the CLI both call these."""

from dpo_engine.stages import evaluate, precompute, register, train, validate
from dpo_engine.stages.common import STAGES

__all__ = ["validate", "precompute", "train", "evaluate", "register", "STAGES"]
