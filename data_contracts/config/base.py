"""What every config section shares: the error type, the strict pydantic base, field types, the builtin
names, the run-name rule and the metric names the trainer logs."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from data_contracts.helpers import redact_credentials

BUILTIN_DATASET = "builtin:answer-format"
BUILTIN_MODEL = "builtin:smollm2-135m-instruct"
# a tiny, randomly initialised mixture-of-experts model (Qwen3-MoE) built offline: configs/moe-tiny.yaml
BUILTIN_MOE_MODEL = "builtin:tiny-qwen3-moe"
BUILTIN_MODELS = (BUILTIN_MODEL, BUILTIN_MOE_MODEL)


class ConfigError(ValueError):
    """A user error in the run configuration (one line, names the field)."""


def _named(loc: str, origin: dict[str, str]) -> str:
    """``loc`` (our dotted field) with the TRL key it came from, when it came from a TRL file."""
    hit = next((p for p in sorted(origin, key=len, reverse=True) if loc == p or loc.startswith(p + ".")), None)
    if hit is not None:
        return f"TRL {origin[hit]} (our {loc})"
    under = sorted({k for p, k in origin.items() if p.startswith(loc + ".")})
    return f"{loc} (from TRL {', '.join(under)})" if under else loc


def format_validation_error(err: ValidationError, origin: dict[str, str] | None = None) -> str:
    """One line naming each failing field (``origin``: our field -> the TRL key it was translated from)."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], (dict, list)):
                msg = f"{msg} (got {redact_credentials(repr(e['input']))})"
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {redact_credentials(repr(e['input']))})"
        parts.append(f"{_named(loc, origin) if origin else loc}: {msg}")
    return "config error: " + "; ".join(parts)


# A name the run cannot do without (a data source, a model, an MLflow name): surrounding spaces are
# dropped, and nothing left is an error.
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
# Seeds feed torch.manual_seed, numpy and an 8-byte hash key: numpy's range, 0 .. 2**32 - 1.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]

# run_name is the run folder under <state home>/runs: one plain folder name, never a path.
RUN_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class Section(BaseModel):
    """A config section: unknown fields are errors, assignments are validated, floats are finite."""

    # allow_inf_nan=False: every float field (also inside lists and dicts) must be finite
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# The metric names the trainer records per step in its history (train/history.json), which is what
# train.early_stopping_metric is looked up in (dpo_engine.training.should_stop): TRL's pair metrics
# (dpo_engine.modeling.losses.pair_metrics) and the step's own, and at every periodic evaluation
# (train.eval_steps) the pair metrics of the eval split under eval/ (dpo_engine.evaluation.preference_metrics).
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")
EVAL_STEP_METRICS = tuple(f"eval/{m}" for m in PAIR_METRICS)
TRAIN_STEP_METRICS = PAIR_METRICS + ("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
                                     "grad_norm", "learning_rate", "tokens_per_second", "num_tokens",
                                     "peak_memory_mb", "mfu", "loss_scale", "overflow_skipped", "aux_loss")
