"""The one typed configuration of a DPO run.

Loaded from YAML, overridden field by field (``--set train.learning_rate=1e-6``) and validated with
pydantic. Unknown or ill-typed fields raise :class:`ConfigError` whose message names the field.
Defaults follow TRL's ``DPOConfig`` where TRL has the knob (beta 0.1, learning rate 1e-6,
max_length 1024, truncation ``keep_start``...).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from data_contracts.helpers import redact_credentials
from data_contracts.state import state_home
from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator,
                      model_validator)

BUILTIN_DATASET = "builtin:answer-format"
BUILTIN_MODEL = "builtin:smollm2-135m-instruct"


class ConfigError(ValueError):
    """A user error in the run configuration (one line, names the field)."""


# A name the run cannot do without (a data source, a model, an MLflow name): surrounding spaces are
# dropped, and nothing left is an error.
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
# Seeds feed torch.manual_seed, numpy and an 8-byte hash key: numpy's range, 0 .. 2**32 - 1.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]

# run_name is the run folder under <state home>/runs: one plain folder name, never a path.
RUN_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class _Section(BaseModel):
    # allow_inf_nan=False: every float field (also inside lists and dicts) must be finite
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def peft_type_names() -> frozenset[str] | None:
    """The names of peft's ``PeftType`` enum (what ``peft.peft_type`` may be, in any case), or None when
    peft cannot be found. ``import peft`` takes seconds (it imports transformers), so unless it is
    already imported the names are read from the installed peft's ``utils/peft_types.py`` without
    running it."""
    peft = sys.modules.get("peft")
    if peft is not None and hasattr(peft, "PeftType"):  # also methods registered at run time
        return frozenset(m.name for m in peft.PeftType)
    return _peft_type_names_from_source()


@functools.cache
def _peft_type_names_from_source() -> frozenset[str] | None:
    try:
        spec = importlib.util.find_spec("peft")
        if spec is None or not spec.submodule_search_locations:
            return None
        src = Path(list(spec.submodule_search_locations)[0]) / "utils" / "peft_types.py"
        tree = ast.parse(src.read_text())
    except (ImportError, OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "PeftType":
            names = frozenset(t.id for st in node.body if isinstance(st, ast.Assign)
                              for t in st.targets if isinstance(t, ast.Name) and not t.id.startswith("_"))
            return names or None
    return None


# The metric names the trainer records per step in its history (train/history.json), which is what
# train.early_stopping_metric is looked up in (dpo_engine.trainer.should_stop): TRL's pair metrics
# (dpo_engine.losses.pair_metrics) and the step's own, and at every periodic evaluation
# (train.eval_steps) the pair metrics of the eval split under eval/ (dpo_engine.evaluation.preference_metrics).
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")
EVAL_STEP_METRICS = tuple(f"eval/{m}" for m in PAIR_METRICS)
TRAIN_STEP_METRICS = PAIR_METRICS + ("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy",
                                     "grad_norm", "learning_rate", "tokens_per_second", "num_tokens",
                                     "peak_memory_mb", "mfu", "loss_scale", "overflow_skipped")


class DataConfig(_Section):
    source: Name = Field(BUILTIN_DATASET, description="Train data: a local file/folder, a hub dataset id, "
                        "or 'builtin:answer-format' (the bundled, generated dataset). '{date}' in a path "
                        "is replaced at run time by today's UTC date (YYYY-MM-DD), also in eval_source, "
                        "e.g. '/data/prefs/{date}.jsonl'.")
    source_partition: Literal["all", "newest"] = Field("all", description="For a folder source: 'all' "
                                                       "reads every file in it; 'newest' takes only its "
                                                       "last entry (sub-folder or file) sorted by name, "
                                                       "e.g. the latest of data/2026-11-22/, data/2026-11-23/.")
    eval_source: str | None = Field(None, description="Held-out data; default: the builtin eval split, or "
                                    "eval_fraction of source.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Held-out share of source when "
                                 "eval_source is not given.")
    format: Name = Field("auto", description="Input layout: auto (detected from the first rows), or a "
                        "named adapter: preference (TRL columns), openai, sharegpt, hh.")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename source columns before "
                                    "detection: {canonical: source}, e.g. {prompt: question, chosen: "
                                    "good, rejected: bad}; a dotted source ('meta.q') reads a nested field.")
    train_limit: int | None = Field(None, ge=1, description="Use only the first N valid train pairs "
                                    "(after a seeded shuffle).")
    eval_limit: int | None = Field(None, ge=1, description="Use only the first N valid eval pairs.")
    max_length: int = Field(1024, ge=8, description="Max tokens of prompt + completion (TRL default).")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra variables for "
                                                 "the chat template of conversational rows, as TRL's "
                                                 "chat_template_kwargs (e.g. {enable_thinking: false} for "
                                                 "Qwen3); a row's own chat_template_kwargs column "
                                                 "overrides them key by key.")
    max_text_chars: int | None = Field(None, ge=1, description="Reject (TEXT_TOO_LONG) a prompt, chosen, "
                                       "rejected or tools field longer than this many characters before "
                                       "tokenizing it (memory grows with a text's length). null: 64 x "
                                       "max_length, at least 100,000.")
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"
    invalid_policy: Literal["fail", "quarantine"] = "quarantine"
    max_invalid_fraction: float = Field(0.05, ge=0.0, le=1.0)
    shuffle_seed: Seed = 0
    num_proc: int | None = Field(None, ge=1, exclude=True, description="Worker processes that parse and "
                                 "tokenize batches (fork). null (auto): min(CPUs, 8) when the input is "
                                 "large (>= 50,000 rows or 16 MiB of files), else 1. The output is "
                                 "identical for any value, so it is not part of the config hash or the "
                                 "saved config.")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        from data_contracts.layouts import RESERVED_TEMPLATE_KWARGS

        bad = sorted(k for k in v if k in RESERVED_TEMPLATE_KWARGS)
        if bad:
            raise ValueError(f"may not set {', '.join(bad)} (the chat template call sets them)")
        return v

    @property
    def text_char_limit(self) -> int:
        """``max_text_chars``, or its default: 64 characters per token of max_length, at least 100,000."""
        return self.max_text_chars or max(100_000, 64 * self.max_length)

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: dict[str, str]) -> dict[str, str]:
        known = ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs", "system", "conversations",
                 "input", "preferred_output", "non_preferred_output")
        for target, src in v.items():
            if target not in known:
                raise ValueError(f"unknown target column {target!r}; use one of {', '.join(known)}")
            if not isinstance(src, str) or not src.strip():
                raise ValueError(f"{target}: source column name must be a non-empty string")
        sources = list(v.values())
        dup = next((s for s in sources if sources.count(s) > 1), None)
        if dup is not None:
            raise ValueError(f"source column {dup!r} is mapped twice")
        return v


class ModelConfig(_Section):
    name_or_path: Name = Field(BUILTIN_MODEL, description="Hugging Face id, local folder, or "
                              "'builtin:smollm2-135m-instruct'.")
    tokenizer: str | None = Field(None, description="Tokenizer id/folder (default: the model's).")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    chat_template_path: str | None = None
    eos_token: str | None = Field(None, description="Override the tokenizer's EOS (e.g. '<|im_end|>' for "
                                  "a Qwen base model); it must be one token and end every assistant turn "
                                  "of the chat template, else the tokenizer load fails with a config error.")
    init_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra from_pretrained "
                                        "arguments: dtype, attn_implementation, device_map, revision...")

    @field_validator("init_kwargs")
    @classmethod
    def _no_security_overrides(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in ("trust_remote_code", "use_safetensors"):
            if key in v:
                raise ValueError(f"{key} cannot be set here; "
                                 + ("use model.trust_remote_code" if key == "trust_remote_code"
                                    else "weights are always loaded from safetensors"))
        return v


class ReferenceConfig(_Section):
    source: Literal["precomputed", "adapter_disabled", "model"] = Field(
        "precomputed", description="precomputed: a cached pass of the reference model (model_path, else "
        "the policy's base) before training; adapter_disabled (needs peft.enabled): the policy itself with "
        "its adapter switched off, computed during training (no cache, no second model); model: a second, "
        "frozen model (model_path, else a copy of the policy's initial weights) run online during "
        "training (no train cache; needed by sync_ref_model).")
    model_path: str | None = Field(None, description="Reference model: a local folder or hub id, loaded like "
                                   "the policy (safetensors only, model.trust_remote_code, model.init_kwargs); "
                                   "used online with source=model, or precomputed with source=precomputed; "
                                   "null: the policy's base model.")
    batch_size: int = Field(16, ge=1, description="Sequences per reference forward pass.")
    sync_ref_model: bool = Field(False, description="TR-DPO: every ref_model_sync_steps optimizer steps the "
                                 "reference becomes alpha * policy + (1 - alpha) * reference (TRL's "
                                 "semantics). Needs source=model (an online reference with the policy's "
                                 "architecture).")
    ref_model_mixup_alpha: float = Field(0.6, ge=0.0, le=1.0, description="TR-DPO alpha: the policy's share "
                                         "in each reference update.")
    ref_model_sync_steps: int = Field(512, ge=1, description="TR-DPO: optimizer steps between reference "
                                      "updates.")

    @model_validator(mode="after")
    def _online_reference(self) -> "ReferenceConfig":
        if self.sync_ref_model and self.source != "model":
            why = ("the precomputed cache is fixed before training" if self.source == "precomputed"
                   else "the adapter-disabled reference shares its weights with the policy")
            raise ValueError(f"reference.sync_ref_model=true (TR-DPO: reference.ref_model_mixup_alpha, "
                             f"reference.ref_model_sync_steps) needs an online reference model: set "
                             f"reference.source=model (with reference.model_path, or none for a copy of the "
                             f"policy's initial weights); with reference.source={self.source} {why}")
        if self.model_path is not None and self.source == "adapter_disabled":
            raise ValueError("reference.model_path has no effect with reference.source=adapter_disabled "
                             "(the reference is the policy with its adapter off); unset it or use "
                             "source=model")
        return self


# Loss names (TRL's ``loss_type`` values plus the reference-free SimPO and ORPO) and the facts the
# validators need. The formulas live in ``dpo_engine.losses``.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo", "orpo")
SMOOTHED_LOSSES = frozenset({"sigmoid", "exo_pair", "robust", "aot", "aot_unpaired", "simpo"})  # read eps
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                                 "discopop", "sft"})  # built on s_c - s_r (TRL rejects the others)
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo"})


class LossConfig(_Section):
    loss_type: str | list[str] = Field("sigmoid", description="One loss or a list combined with "
                                       "loss_weights: " + ", ".join(LOSS_TYPES) + ".")
    loss_weights: list[float] | None = Field(None, description="One weight per loss type (default all "
                                             "1.0); total = sum_k w_k * mean(loss_k). MPO: [0.8, 0.2, 1.0].")
    beta: float = Field(0.1, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="eps: cDPO for sigmoid/aot/simpo, "
                                   "flip rate for robust (< 0.5), EXO's eps for exo_pair (> 0, 1e-3).")
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = \
        "reverse_kl"
    f_alpha_divergence_coef: float = Field(0.5, ge=0.0, le=1.0, description="alpha of alpha_divergence "
                                           "(0: forward_kl, 1: reverse_kl).")
    discopop_tau: float = Field(0.05, gt=0.0)
    use_weighting: bool = Field(False, description="WPO: each pair's loss times w_c * w_r.")
    ld_alpha: float | None = Field(None, ge=0.0, le=1.0, description="LD-DPO: weight of the tokens past "
                                   "min(Lc, Lr); null: off.")
    simpo_gamma: float = Field(0.5, ge=0.0, description="SimPO target margin gamma.")
    orpo_lambda: float = Field(0.1, ge=0.0, description="ORPO weight of the odds-ratio term.")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _known_types(cls, v: Any) -> Any:
        names = [v] if isinstance(v, str) else v
        if isinstance(names, list):
            if not names:
                raise ValueError("needs at least one loss type")
            for n in names:
                if isinstance(n, str) and n not in LOSS_TYPES:
                    raise ValueError(f"unknown loss type {n!r}; choose from {', '.join(LOSS_TYPES)}")
            if len(set(names)) != len(names):
                raise ValueError("lists a loss type twice")
        return v

    @field_validator("loss_weights")
    @classmethod
    def _finite_weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(not (w >= 0.0 and w < float("inf")) for w in v):
            raise ValueError("weights must be finite and >= 0")
        return v

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def weights(self) -> list[float]:
        return list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(self.loss_types)

    @model_validator(mode="after")
    def _combinations(self) -> "LossConfig":
        types, eps = self.loss_types, self.label_smoothing
        named = "loss_type=" + "+".join(types)
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"loss.loss_weights has {len(self.loss_weights)} entries but loss.loss_type "
                             f"has {len(types)}")
        smoothed = [t for t in types if t in SMOOTHED_LOSSES]
        if eps and not smoothed:
            raise ValueError(f"loss.label_smoothing has no effect with {named}; set it to 0")
        if "exo_pair" in types and eps == 0:
            raise ValueError("loss.label_smoothing must be > 0 with loss_type=exo_pair (1e-3 recommended)")
        if eps >= 0.5 and any(t != "exo_pair" for t in smoothed):
            raise ValueError(f"loss.label_smoothing must be < 0.5 with {named} (a flip rate of 0.5 or more "
                             "reverses the preferences)")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(types):
            raise ValueError(f"loss.use_weighting is not supported with {named} (aot sorts the batch)")
        if self.f_divergence_type != "reverse_kl":
            bad = [t for t in types if t not in F_DIVERGENCE_LOSSES]
            if bad:
                raise ValueError(f"loss.f_divergence_type={self.f_divergence_type} does not apply to "
                                 f"{', '.join(bad)}; only to {', '.join(sorted(F_DIVERGENCE_LOSSES))}")
        return self


class PeftConfig(_Section):
    enabled: bool = Field(False, description="Train a PEFT adapter instead of all weights.")
    peft_type: Name = Field("LORA", description="peft's type name (PeftType, any case): LORA, IA3, LOKR, "
                            "LOHA, ...")
    r: int = Field(16, ge=1, description="LoRA rank (LORA only).")
    lora_alpha: float = Field(32.0, gt=0.0, description="LoRA scale numerator (LORA only).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA input dropout (LORA only).")
    target_modules: str | list[str] | None = Field("all-linear", description="Modules that get adapters.")
    modules_to_save: list[str] | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="Passed through to the peft config "
                                  "class (e.g. use_dora, use_rslora, init_lora_weights).")
    adapter_path: str | None = Field(None, description="Continue training this saved adapter folder.")
    export: Literal["merged", "adapter"] = Field("merged", description="train/model/: merged full "
                                                 "weights (downstream unchanged) or the adapter only.")

    @field_validator("peft_type")
    @classmethod
    def _known_peft_type(cls, v: str) -> str:
        known = peft_type_names()
        if known is not None and v.upper() not in known:
            raise ValueError(f"unknown PEFT type {v!r}; the installed peft knows {', '.join(sorted(known))}")
        return v


class TrainConfig(_Section):
    per_device_train_batch_size: int = Field(8, ge=1, description="Pairs per micro-batch.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-6, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="0 disables clipping.")
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    num_train_epochs: float = Field(1.0, gt=0.0)
    max_steps: int = Field(-1, description="Optimizer steps; -1 derives them from num_train_epochs.")
    seed: Seed = 42
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="fp16: float16 autocast "
                                                               "with dynamic loss scaling (GPUs without bf16, "
                                                               "e.g. T4/V100; a step whose gradients overflow "
                                                               "is skipped and the scale halved). auto: fp32 on CPU, bf16 "
                                                       "autocast on GPU.")
    logging_steps: int = Field(10, ge=1, description="Send the step metrics to MLflow every N optimizer steps "
                               "(and at the last step); every step's metrics stay in train/history.json.")
    save_steps: int = Field(0, ge=0, description="Checkpoint every N steps, and always at the end "
                            "(0: only at the end).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (the newest); older ones are deleted.")
    disable_dropout: bool = Field(True, description="Dropout off in the policy (TRL's default); the reference "
                                  "never uses dropout. A LoRA adapter's own dropout (peft.lora_dropout) "
                                  "is not affected.")
    grad_filter_eps: float = Field(0.0, ge=0.0, lt=1.0, description="Fused head: skip vocabulary tiles whose "
                                   "largest softmax value is below this in backward (cut cross-entropy's "
                                   "gradient filtering; 2**-12 is its default). 0: off; the gradients are "
                                   "then exact.")
    logit_chunk_size: int = Field(8192, ge=128, description="Vocabulary tile of the fused log-prob head.")
    padding_free: bool = Field(False, description="Pack each micro-batch's sequences into one row without "
                               "padding (per-sequence position ids; attention confined to each sequence).")
    pad_to_multiple_of: int | None = Field(None, ge=1, description="Round each padded micro-batch's length "
                                           "up to a multiple of this (as TRL's pad_to_multiple_of): "
                                           "tensor-core friendly shapes and fewer distinct shapes for "
                                           "train.compile; ignored with padding_free.")
    compile: bool = Field(False, description="torch.compile each decoder layer (inductor, dynamic shapes): fuses "
                          "the layers' elementwise work; on an H100 steady-state steps ran 2-2.5x faster, but each "
                          "new shape class recompiles (seconds), so it pays off on long runs (BENCHMARKS.md).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (non-reentrant "
                                         "checkpointing): less memory, about one more forward of compute. "
                                         "Off by default (TRL: on), since the fused head already keeps the "
                                         "logits out of memory and small CPU runs only pay the extra time.")
    master_weights: bool = Field(True, description="With 16-bit model weights (model.dtype bfloat16/float16): "
                                 "the optimizer steps fp32 copies and the model gets them rounded after each "
                                 "step (false: the 16-bit weights are stepped directly and every update below "
                                 "1/256 of a weight is lost, as at usual DPO learning rates).")
    optim: Literal["adamw_torch", "adamw_8bit"] = Field("adamw_torch", description="adamw_8bit: bitsandbytes "
                                                        "8-bit AdamW (CUDA only, bitsandbytes installed).")
    peak_tflops: float | None = Field(None, gt=0.0, description="Peak FLOP/s of one device (TFLOP/s) for the "
                                      "logged 'mfu'; null: a table of known GPUs (no mfu elsewhere).")
    eval_steps: int = Field(0, ge=0, description="Evaluate on the eval split every N steps, logged as eval/* "
                            "(0: off).")
    early_stopping_metric: str | None = Field(None, description="Stop when this logged metric (e.g. "
                                              "'eval/rewards/accuracies') has not improved for "
                                              "early_stopping_patience evaluations; null: never.")
    early_stopping_patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    early_stopping_mode: Literal["max", "min"] = "max"
    num_processes: int = Field(1, ge=1, description="Data-parallel processes on this machine; > 1 launches "
                               "the precompute and train stages through `accelerate launch` (torchrun): "
                               "one process per GPU, or gloo processes on the CPU. Each takes its share of "
                               "every step's pairs (per_device_train_batch_size each); the update equals "
                               "one process with the global batch.")
    accelerate_config: str | None = Field(None, description="An accelerate config file (`accelerate config`; "
                                          "e.g. configs/accelerate/fsdp.yaml) for `accelerate launch "
                                          "--config_file`: setting it launches the precompute and train "
                                          "stages through accelerate; num_processes > 1 overrides its "
                                          "num_processes.")

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("must be -1 (use num_train_epochs) or a positive number of steps")
        return v

    @field_validator("early_stopping_metric")
    @classmethod
    def _logged_metric(cls, v: str | None) -> str | None:
        if v is not None and v not in EVAL_STEP_METRICS + TRAIN_STEP_METRICS:
            raise ValueError(f"the trainer logs no metric {v!r}; use one measured at each train.eval_steps "
                             f"evaluation: {', '.join(EVAL_STEP_METRICS)}; or a train step metric: "
                             f"{', '.join(TRAIN_STEP_METRICS)}; or null (no early stopping)")
        return v

    @model_validator(mode="after")
    def _early_stopping(self) -> "TrainConfig":
        m = self.early_stopping_metric
        if m and m.startswith("eval/") and self.eval_steps == 0:
            raise ValueError(f"train.early_stopping_metric={m!r} needs train.eval_steps > 0")
        return self


class EvalConfig(_Section):
    batch_size: int = Field(16, ge=1)
    num_prompts: int = Field(32, ge=0, description="Held-out prompts to generate on (0: no generation).")
    max_new_tokens: int = Field(32, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Seed = 0
    judge: str | None = Field("data_contracts.builtin:judge", description="'module:function' scoring "
                              "(prompt, response, row) -> float (higher is better), or "
                              "'reward_model:<folder or hub id>' (a sequence-classification reward "
                              "model); null: no judge.")


class GateConfig(_Section):
    thresholds: dict[str, float] = Field(default_factory=dict, description="metric -> minimum value "
                                         "required for the new version to become champion.")
    beat_champion_metric: str | None = Field(None, description="Also require the new version to beat "
                                             "the current champion on this metric (e.g. 'eval/win_rate') "
                                             "by at least min_improvement; null: no comparison.")
    min_improvement: float = Field(0.0, description="new - champion must be >= this (0: a tie passes).")


class RegistryConfig(_Section):
    enabled: bool = True
    experiment: Name = Field("dpo", max_length=500, description="MLflow experiment of the runs.")
    model_name: Name = Field("dpo-policy", description="MLflow registered model name (no '/', ':' or "
                             "quote; MLflow rejects them at registration).")
    gate: GateConfig = Field(default_factory=GateConfig)
    skip_unchanged: bool = Field(False, description="End the flow early ('skipped: nothing new') when "
                                 "the data fingerprint and config hash equal those tagged on the current "
                                 "champion version. The nightly schedule sets it; manual runs train.")
    retry_timeout_s: float = Field(600.0, ge=0, description="How long MLflow writes keep retrying an "
                                   "unreachable tracking store (connection refused, time-out, HTTP 5xx, locked "
                                   "SQLite) before the stage fails with one line; registration waits this long "
                                   "for the server to come back. Training never waits: its metrics are kept in "
                                   "an outbox file and sent when the server answers. 0: one try.")
    retry_backoff_s: float = Field(2.0, gt=0, description="First wait between MLflow retries; doubles after "
                                   "each failure up to retry_max_backoff_s.")
    retry_max_backoff_s: float = Field(60.0, gt=0, description="Longest wait between MLflow retries.")

    @field_validator("model_name")
    @classmethod
    def _registrable(cls, v: str) -> str:
        bad = sorted({c for c in v if c in "/:'\""})
        if bad:
            raise ValueError(f"may not contain {' or '.join(repr(c) for c in bad)} (MLflow model names)")
        if v == "." or v.startswith(".."):
            raise ValueError("may not be '.' or start with '..' (MLflow model names)")
        return v




class TrackingConfig(_Section):
    mlflow_tracking_uri: str | None = Field(None, description="Default: SQLite store under the state "
                                            "home. Or set MLFLOW_TRACKING_URI. No password in it (the config "
                                            "is saved with the run): MLflow reads MLFLOW_TRACKING_USERNAME "
                                            "and MLFLOW_TRACKING_PASSWORD from the environment.")

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_password(cls, v: str | None) -> str | None:
        if v is not None and redact_credentials(v) != v:
            raise ValueError("holds credentials (user:password@); the config is saved with every run: set "
                             "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment instead")
        return v


class RunConfig(_Section):
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


# --------------------------------------------------------------------------------------------- loading

def _format_error(err: ValidationError) -> str:
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
        parts.append(f"{loc}: {msg}")
    return "config error: " + "; ".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.learning_rate=1e-6`` -> (['train', 'learning_rate'], 1e-06). Values are YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"config error: override {item!r} must look like section.field=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"config error: override {item!r} has an empty field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, overrides: dict[str, Any] | list[str] | None) -> dict:
    """Apply ``{'train.lr': 1e-6}`` or ``['train.lr=1e-6']`` onto a nested dict (copied)."""
    out = json.loads(json.dumps(data))
    if not overrides:
        return out
    items = ([parse_override(o) for o in overrides] if isinstance(overrides, list)
             else [([p for p in k.split(".") if p], v) for k, v in overrides.items()])
    for path, value in items:
        node = out
        for p in path[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"config error: {'.'.join(path)}: {p} is not a section")
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


def load_config(path: str | os.PathLike | None = None,
                overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """Read YAML (or start from defaults), apply overrides, validate. Raises ConfigError."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config error: file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config error: {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config error: {p} must hold a mapping of sections")
    data = apply_overrides(data, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
