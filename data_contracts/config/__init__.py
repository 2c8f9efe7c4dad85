"""The one typed configuration of a DPO run.

Loaded from YAML, overridden field by field (``--set train.learning_rate=1e-6``) and validated with
pydantic. Unknown or ill-typed fields raise :class:`ConfigError` whose message names the field.
Defaults follow TRL's ``DPOConfig`` where TRL has the knob (beta 0.1, learning rate 1e-6,
max_length 1024, truncation ``keep_start``...). Each section lives in its own module; this package
re-exports the names the rest of the project imports.
"""

from data_contracts.config.base import (BUILTIN_DATASET, BUILTIN_MODEL, BUILTIN_MODELS, BUILTIN_MOE_MODEL,
                                        EVAL_STEP_METRICS, PAIR_METRICS, TRAIN_STEP_METRICS, ConfigError)
from data_contracts.config.data import DataConfig
from data_contracts.config.evaluation import EvalConfig
from data_contracts.config.loading import load_config, parse_overrides
from data_contracts.config.loss import LOSS_TYPES, REFERENCE_FREE_LOSSES, LossConfig
from data_contracts.config.model import ModelConfig, PeftConfig, ReferenceConfig
from data_contracts.config.run import RunConfig
from data_contracts.config.train import TrainConfig

__all__ = [
    "BUILTIN_DATASET", "BUILTIN_MODEL", "BUILTIN_MODELS", "BUILTIN_MOE_MODEL", "EVAL_STEP_METRICS", "LOSS_TYPES",
    "PAIR_METRICS",
    "REFERENCE_FREE_LOSSES", "TRAIN_STEP_METRICS", "ConfigError", "DataConfig", "EvalConfig", "LossConfig",
    "ModelConfig", "PeftConfig", "ReferenceConfig", "RunConfig", "TrainConfig", "load_config", "parse_overrides",
]
