"""The ``train`` section: optimizer, schedule, precision, checkpoints, evaluation cadence, processes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from data_contracts.config.base import EVAL_STEP_METRICS, TRAIN_STEP_METRICS, Section, Seed


class TrainConfig(Section):
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
