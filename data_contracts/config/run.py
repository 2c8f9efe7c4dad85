"""The whole run configuration: every section, the run name, section hashes and the YAML dump."""

from __future__ import annotations

import hashlib
import json

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from data_contracts.config.base import RUN_NAME_RE, ConfigError, Section, format_validation_error
from data_contracts.config.data import DataConfig
from data_contracts.config.evaluation import EvalConfig
from data_contracts.config.loss import LossConfig
from data_contracts.config.model import ModelConfig, PeftConfig, ReferenceConfig
from data_contracts.config.tracking import RegistryConfig, TrackingConfig
from data_contracts.config.train import TrainConfig


class RunConfig(Section):
    run_name: str | None = Field(None, description="Run folder name under <state home>/runs (default: time "
                                 "stamp + config hash): 1-128 letters, digits, '.', '_' or '-', not starting "
                                 "with '.'.")
    data: DataConfig = Field(default_factory=DataConfig, description="The preference pairs: sources, "
                             "layout, limits, truncation and the reject policy (validate stage).")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The policy model and its tokenizer.")
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig, description="What the policy is "
                                       "compared with (precompute stage, or online).")
    peft: PeftConfig = Field(default_factory=PeftConfig, description="A PEFT adapter (LoRA...) instead of "
                             "training every weight.")
    loss: LossConfig = Field(default_factory=LossConfig, description="The preference loss.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimizer, schedule, precision, "
                               "checkpoints and processes (train stage).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Held-out generations and their judge "
                             "(evaluate stage).")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow experiment, "
                                     "registered model and the promotion gate (register stage).")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Where MLflow is.")

    @field_validator("run_name")
    @classmethod
    def _folder_name(cls, v: str | None) -> str | None:
        if v is not None and not RUN_NAME_RE.fullmatch(v):
            raise ValueError("must be one folder name: 1-128 letters, digits, '.', '_' or '-', not starting "
                             "with '.' (no path separators or spaces)")
        return v

    @model_validator(mode="after")
    def _cross(self) -> "RunConfig":
        return self

    def section_hash(self, *names: str) -> str:
        """Stable hash of the named sections (e.g. ``"data", "model"``): a cache-key component."""
        blob = json.dumps({n: getattr(self, n).model_dump(mode="json") for n in names}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def validate(data: dict, origin: dict[str, str] | None = None) -> RunConfig:
    """A nested config mapping -> RunConfig; ConfigError naming each bad field (and, with ``origin``,
    the TRL key it was translated from)."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None
