"""The one table of the pipeline's stages: their order, what each one's result is called, and which
upstream results each takes. The flow, the Prefect tasks, the sweep and the per-stage CLI commands
all read it; nothing else writes the chain down."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from dpo_engine.stages import evaluate, precompute, register, train, validate


@dataclass(frozen=True)
class Stage:
    name: str
    module: ModuleType  # has ``key(cfg, *key_inputs)`` and ``run(cfg, run_dir, *inputs)``
    result: str  # what downstream stages (and task parameters) call its result
    inputs: tuple[str, ...]  # upstream stages whose results ``run`` takes, in order
    key_inputs: tuple[str, ...]  # of those, the ones its content fingerprint ``key`` takes

    def key(self, cfg, results: dict[str, dict]) -> str:
        """This stage's fingerprint from the upstream ``results`` (by stage name)."""
        return self.module.key(cfg, *(results[u] for u in self.key_inputs))

    def run(self, cfg, run_dir, results: dict[str, dict]) -> dict:
        """Run this stage on the upstream ``results`` (by stage name)."""
        return self.module.run(cfg, run_dir, *(results[u] for u in self.inputs))


PIPELINE: tuple[Stage, ...] = (
    Stage("validate", validate, "validated", (), ()),
    Stage("precompute", precompute, "precomputed", ("validate",), ("validate",)),
    Stage("train", train, "trained", ("validate", "precompute"), ("precompute",)),
    Stage("evaluate", evaluate, "evaluated", ("validate", "precompute", "train"), ("train",)),
    Stage("register", register, "registered", ("validate", "train", "evaluate"), ("train", "evaluate")),
)
STAGE = {s.name: s for s in PIPELINE}
STAGES = tuple(STAGE)  # the names, in order
