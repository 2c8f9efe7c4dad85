"""The whole run configuration: every section, the run name, section hashes and the YAML dump."""

from __future__ import annotations

import hashlib
import json

import yaml
from pydantic import Field, field_validator, model_validator

from data_contracts.config.base import RUN_NAME_RE, Section
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
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

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
