"""The ``train`` section: optimizer, schedule, precision, checkpoints, evaluation cadence, processes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from data_contracts.config.base import EVAL_STEP_METRICS, TRAIN_STEP_METRICS, Section, Seed

# transformers' schedule names (SchedulerType) that run from a step count alone, and the extra
# arguments each takes through lr_scheduler_kwargs (tests/test_schedules.py checks them against the
# installed transformers). reduce_lr_on_plateau is left out: it needs an evaluation metric per step.
SCHEDULER_KWARGS: dict[str, tuple[str, ...]] = {
    "linear": (), "cosine": ("num_cycles",), "cosine_with_restarts": ("num_cycles",),
    "polynomial": ("lr_end", "power"), "constant": (), "constant_with_warmup": (),
    "inverse_sqrt": ("timescale",), "cosine_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate"),
    "cosine_warmup_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate", "warmup_lr_rate"),
    "warmup_stable_decay": ("num_stable_steps", "num_decay_steps", "warmup_type", "decay_type",
                            "min_lr_ratio", "num_cycles"),
}
SCHEDULERS = tuple(SCHEDULER_KWARGS)
SchedulerName = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                        "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr",
                        "cosine_warmup_with_min_lr", "warmup_stable_decay"]
# TRL's/transformers' optimizer names (OptimizerNames) the engine builds (dpo_engine.training.optim)
OptimizerName = Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop",
                        "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"]
BNB_OPTIMIZERS = frozenset({"adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"})


class TrainConfig(Section):
    per_device_train_batch_size: int = Field(8, ge=1, description="Pairs per micro-batch (per process).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step; the "
                                             "gradients of a step are exact (summed, normalised by the "
                                             "step's pair count).")
    learning_rate: float = Field(1e-6, gt=0.0, description="Peak learning rate (TRL's default 1e-6), "
                                 "reached after the warmup; the schedule scales it from there.")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay of the optimizer.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="Adam's beta1 (adamw_* and 8-bit optimizers).")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="Adam's beta2 (adamw_* and 8-bit optimizers).")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="Adam's epsilon (adamw_* and 8-bit optimizers), "
                                "as transformers' TrainingArguments.")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Clip the global gradient norm to this; 0 "
                                 "disables clipping.")
    lr_scheduler_type: SchedulerName = Field("linear", description="Learning-rate schedule, computed by "
                                             "transformers.get_scheduler exactly as the HF Trainer/TRL do: "
                                             + ", ".join(SCHEDULERS) + ". constant has no warmup "
                                             "(constant_with_warmup has); warmup goes from 0 to "
                                             "learning_rate over the warmup steps.")
    lr_scheduler_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra arguments of the "
                                                "schedule (transformers' lr_scheduler_kwargs), e.g. "
                                                "{num_cycles: 2} for cosine_with_restarts, {min_lr_rate: 0.1} "
                                                "for cosine_with_min_lr (which needs min_lr or min_lr_rate), "
                                                "{power: 2.0, lr_end: 1.0e-7} for polynomial, "
                                                "{num_decay_steps: 100} for warmup_stable_decay (which needs it).")
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Share of the optimizer steps spent warming "
                                "up: ceil(warmup_ratio * steps) steps, as transformers.")
    warmup_steps: int = Field(0, ge=0, description="Warmup steps; when > 0 it overrides warmup_ratio (as "
                              "transformers).")
    num_train_epochs: float = Field(1.0, gt=0.0, description="Passes over the train pairs (fractions "
                                    "allowed) when max_steps is -1. TRL's default is 3.")
    max_steps: int = Field(-1, description="Optimizer steps; -1 derives them from num_train_epochs.")
    seed: Seed = Field(42, description="Seeds the pair order (one permutation per epoch), dropout and "
                       "the adapter's initialisation.")
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
    router_aux_loss_coef: float | None = Field(None, ge=0.0, description="Mixture-of-experts models: weight of "
                                               "the routers' load-balancing loss added to the preference loss "
                                               "(TRL: loss + coef * aux_loss), logged as aux_loss. null: the model "
                                               "config's router_aux_loss_coef; 0: off. A value for a model without "
                                               "a router is a config error. A step's aux_loss is that of all its "
                                               "tokens, whatever the micro-batch and rank split (README).")
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
    optim: OptimizerName = Field("adamw_torch", description="Optimizer, by TRL's/transformers' name: "
                                 "adamw_torch (torch AdamW), adamw_torch_fused (its fused kernel), adafactor "
                                 "(transformers' Adafactor at a fixed learning rate, as the HF Trainer), "
                                 "sgd, adagrad, rmsprop (torch), adamw_8bit/adamw_bnb_8bit, "
                                 "paged_adamw_8bit, paged_adamw_32bit (bitsandbytes: CUDA only, "
                                 "bitsandbytes installed).")
    peak_tflops: float | None = Field(None, gt=0.0, description="Peak FLOP/s of one device (TFLOP/s) for the "
                                      "logged 'mfu'; null: a table of known GPUs (no mfu elsewhere).")
    eval_steps: int = Field(0, ge=0, description="Evaluate on the eval split every N steps, logged as eval/* "
                            "(0: off).")
    early_stopping_metric: str | None = Field(None, description="Stop when this logged metric (e.g. "
                                              "'eval/rewards/accuracies') has not improved for "
                                              "early_stopping_patience evaluations; null: never.")
    early_stopping_patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    early_stopping_mode: Literal["max", "min"] = Field("max", description="max: higher "
                                                       "early_stopping_metric is better; min: lower is.")
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
    def _schedule_kwargs(self) -> "TrainConfig":
        known = SCHEDULER_KWARGS[self.lr_scheduler_type]
        bad = sorted(k for k in self.lr_scheduler_kwargs if k not in known)
        if bad:
            raise ValueError(f"train.lr_scheduler_kwargs: {', '.join(bad)} not taken by lr_scheduler_type="
                             f"{self.lr_scheduler_type} (it takes {', '.join(known) or 'no extra arguments'})")
        if self.lr_scheduler_type.endswith("with_min_lr") and \
                ("min_lr" in self.lr_scheduler_kwargs) == ("min_lr_rate" in self.lr_scheduler_kwargs):
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type} needs exactly one of min_lr or "
                             "min_lr_rate in train.lr_scheduler_kwargs (e.g. {min_lr_rate: 0.1})")
        lr_end = self.lr_scheduler_kwargs.get("lr_end", 1e-7)  # transformers' default
        if self.lr_scheduler_type == "polynomial" and isinstance(lr_end, (int, float)) and lr_end >= self.learning_rate:
            raise ValueError(f"lr_scheduler_type=polynomial decays to lr_end={lr_end} (train.lr_scheduler_kwargs; "
                             f"default 1e-7), which must be below train.learning_rate={self.learning_rate}")
        if self.lr_scheduler_type == "warmup_stable_decay" and "num_decay_steps" not in self.lr_scheduler_kwargs:
            raise ValueError("lr_scheduler_type=warmup_stable_decay needs num_decay_steps in "
                             "train.lr_scheduler_kwargs (e.g. {num_decay_steps: 100})")
        return self

    @model_validator(mode="after")
    def _early_stopping(self) -> "TrainConfig":
        m = self.early_stopping_metric
        if m and m.startswith("eval/") and self.eval_steps == 0:
            raise ValueError(f"train.early_stopping_metric={m!r} needs train.eval_steps > 0")
        return self

    # Checks that catch broken runs (issue 18): the step-1 reference check and the best checkpoint.
    check_reference_at_start: bool = Field(True, description="At step 1, when the reference is the starting "
                                           "policy (no reference.model_path elsewhere, no trained or non-identity "
                                           "adapter, no resume), stop when the policy's log-probs differ from the "
                                           "reference's beyond the precision's rounding (rewards must be 0, the "
                                           "sigmoid loss ln 2): a reference computed with another tokenization, "
                                           "template, truncation, precision or model.")
    metric_for_best_model: str | None = Field(None, description="A periodic evaluation metric (eval/loss, "
                                              "eval/rewards/accuracies, ...; 'loss' and 'eval_loss' mean "
                                              "eval/loss) that picks the best checkpoint (kept by the pruning, "
                                              "named in the result); null: eval/loss with "
                                              "load_best_model_at_end, else none.")
    greater_is_better: bool | None = Field(None, description="Whether a larger metric_for_best_model is better; "
                                           "null: false for a metric ending in 'loss', else true (transformers).")
    load_best_model_at_end: bool = Field(False, description="train/model (so evaluate and register) gets the "
                                         "best checkpoint's weights, not the last step's; needs eval_steps > 0 "
                                         "and save_steps a multiple of eval_steps.")

    @field_validator("metric_for_best_model")
    @classmethod
    def _eval_metric(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("eval/"):  # transformers' spellings: eval_loss, loss
            v = f"eval/{v.removeprefix('eval_')}"
        if v is not None and v not in EVAL_STEP_METRICS:
            raise ValueError(f"the periodic evaluation measures no {v!r}; use one of {', '.join(EVAL_STEP_METRICS)}")
        return v

    @model_validator(mode="after")
    def _best_model(self) -> "TrainConfig":
        wants = self.load_best_model_at_end or self.metric_for_best_model is not None
        if wants and self.eval_steps == 0:
            what = "load_best_model_at_end" if self.load_best_model_at_end else "metric_for_best_model"
            raise ValueError(f"train.{what} needs periodic evaluations: set train.eval_steps > 0")
        if self.load_best_model_at_end and (self.save_steps == 0 or self.save_steps % self.eval_steps):
            raise ValueError(f"train.load_best_model_at_end needs a checkpoint at evaluations: train.save_steps "
                             f"({self.save_steps}) must be a positive multiple of train.eval_steps ({self.eval_steps})")
        return self
