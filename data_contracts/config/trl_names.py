"""The one table of TRL names: every name of TRL 1.16's ``DPOConfig`` (with transformers'
``TrainingArguments`` under it), ``ScriptArguments``, ``ModelConfig`` and ``DatasetMixtureConfig``, and
the older DPOConfig names users still have in their files, with what each becomes here.

- ``FIELDS``: copied as it is to one of our fields (our config validates the value);
- ``CONVERTED``: translated by :mod:`data_contracts.config.trl` (the value decides the field or needs a
  conversion); the text says how;
- ``IGNORED``: accepted whatever the value, with no effect here, and printed with the reason;
- ``NOOP_ONLY``: accepted (and printed as ignored) only at a value that does nothing (TRL's default);
  any other value is refused by name with the reason.

A name in none of them is refused as not a TRL name. ``tests/test_trl_config.py`` checks that every
field of the installed transformers' ``TrainingArguments`` is in one of them.
"""

from __future__ import annotations

# TRL name -> our dotted field
FIELDS: dict[str, str] = {
    # ModelConfig / ScriptArguments
    "model_name_or_path": "model.name_or_path",
    "trust_remote_code": "model.trust_remote_code",
    "attn_implementation": "model.init_kwargs.attn_implementation",
    "use_peft": "peft.enabled",
    "lora_r": "peft.r",
    "lora_alpha": "peft.lora_alpha",
    "lora_dropout": "peft.lora_dropout",
    "lora_modules_to_save": "peft.modules_to_save",
    "lora_target_parameters": "peft.extra.target_parameters",
    "use_rslora": "peft.extra.use_rslora",
    "use_dora": "peft.extra.use_dora",
    # DPOConfig
    "router_aux_loss_coef": "train.router_aux_loss_coef",
    "disable_dropout": "train.disable_dropout",
    "dataset_num_proc": "data.num_proc",
    "truncation_mode": "data.truncation_mode",
    "padding_free": "train.padding_free",
    "precompute_ref_batch_size": "reference.batch_size",
    "loss_weights": "loss.loss_weights",
    "ld_alpha": "loss.ld_alpha",
    "load_best_model_at_end": "train.load_best_model_at_end",
    "metric_for_best_model": "train.metric_for_best_model",
    "greater_is_better": "train.greater_is_better",
    "f_divergence_type": "loss.f_divergence_type",
    "f_alpha_divergence_coef": "loss.f_alpha_divergence_coef",
    "label_smoothing": "loss.label_smoothing",
    "beta": "loss.beta",
    "use_weighting": "loss.use_weighting",
    "discopop_tau": "loss.discopop_tau",
    "sync_ref_model": "reference.sync_ref_model",
    "ref_model_mixup_alpha": "reference.ref_model_mixup_alpha",
    "ref_model_sync_steps": "reference.ref_model_sync_steps",
    # TrainingArguments
    "per_device_train_batch_size": "train.per_device_train_batch_size",
    "per_device_eval_batch_size": "eval.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "num_train_epochs": "train.num_train_epochs",
    "max_steps": "train.max_steps",
    "learning_rate": "train.learning_rate",
    "lr_scheduler_type": "train.lr_scheduler_type",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "adam_beta1": "train.adam_beta1",
    "adam_beta2": "train.adam_beta2",
    "adam_epsilon": "train.adam_epsilon",
    "max_grad_norm": "train.max_grad_norm",
    "seed": "train.seed",
    "torch_compile": "train.compile",
    "run_name": "run_name",
}

# TRL name -> how data_contracts.config.trl translates it
CONVERTED: dict[str, str] = {
    "dataset_name": "data.source (a hub id gets @<dataset_train_split>; a local folder's <split>.* file is "
                    "taken when there is one)",
    "dataset_train_split": "the split of dataset_name read as data.source",
    "dataset_test_split": "data.eval_source (the same dataset's split); unset: data.eval_fraction of the "
                          "train data is held out",
    "dataset_config": "refused unless null: data.source has no hub configuration name",
    "model_revision": "model.revision ('main' is the default)",
    "dtype": "model.dtype (auto: model.init_kwargs.dtype auto, the checkpoint's dtype, as transformers)",
    "model_init_kwargs": "model.init_kwargs; its dtype/torch_dtype, revision and trust_remote_code go to "
                         "model.dtype, model.revision and model.trust_remote_code",
    "lora_target_modules": "peft.target_modules (a list of one name becomes that name, as TRL does)",
    "lora_task_type": "must be CAUSAL_LM (the only task trained here)",
    "loss_type": "loss.loss_type (a string or a list)",
    "rpo_alpha": "loss.loss_type gets 'sft' with loss.loss_weights alpha (RPO, TRL 1.x's form)",
    "max_length": "data.max_length (null, no truncation, is refused: give a number)",
    "pad_to_multiple_of": "train.pad_to_multiple_of ('auto' and null: no rounding off Neuron)",
    "precompute_ref_log_probs": "reference.source precomputed; false keeps it precomputed (same log-probs "
                                "as an online frozen reference) unless sync_ref_model needs an online one",
    "bf16": "train.precision bf16 (false with fp16 false: fp32)",
    "fp16": "train.precision fp16",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing (transformers 5's name)",
    "lr_scheduler_kwargs": "train.lr_scheduler_kwargs (a dict or its JSON string)",
    "warmup_steps": "train.warmup_steps (>= 1), or train.warmup_ratio (below 1, as transformers 5 reads it)",
    "optim": "train.optim, for the names the engine builds",
    "eval_strategy": "steps: train.eval_steps (eval_steps, else logging_steps); no: no periodic "
                     "evaluation (the evaluate stage still runs at the end)",
    "eval_steps": "train.eval_steps when eval_strategy is steps",
    "save_strategy": "steps: train.save_steps; no: only the final checkpoint",
    "save_steps": "train.save_steps when save_strategy is steps",
    "save_total_limit": "train.save_total_limit (null: ours, the newest 2)",
    "logging_steps": "train.logging_steps (whole steps)",
    "logging_strategy": "steps only (every step is also kept in train/history.json)",
}

# TRL name -> why it has no effect here (accepted with any value, printed)
IGNORED: dict[str, str] = {
    "output_dir": "a run's outputs go to $DPO_HOME/runs/<run_name>/, its model to train/model/ there",
    "logging_dir": "logs go to the run folder and MLflow",
    "overwrite_output_dir": "each run has its own folder",
    "report_to": "runs are logged to MLflow, tracking.mlflow_tracking_uri; other integrations are not called",
    "project": "the MLflow experiment is registry.experiment",
    "trackio_space_id": "Trackio is not used; runs are logged to MLflow",
    "trackio_bucket_id": "Trackio is not used; runs are logged to MLflow",
    "trackio_static_space_id": "Trackio is not used; runs are logged to MLflow",
    "logging_first_step": "every step's metrics are kept in train/history.json",
    "log_on_each_node": "rank 0 alone logs",
    "logging_nan_inf_filter": "a non-finite loss stops training with the last good checkpoint named",
    "log_level": "our logging is not configured through TRL names",
    "log_level_replica": "our logging is not configured through TRL names",
    "disable_tqdm": "no Trainer progress bar here",
    "skip_memory_metrics": "peak memory is logged every step (peak_memory_mb)",
    "include_num_input_tokens_seen": "num_tokens is always logged",
    "do_train": "the pipeline always trains",
    "do_eval": "the evaluate stage always runs (periodic evaluation: eval_strategy steps)",
    "do_predict": "the evaluate stage generates from held-out prompts (eval.num_prompts)",
    "remove_unused_columns": "no Trainer data collator here: the validate stage keeps what it needs",
    "dataloader_num_workers": "no DataLoader: validation has its own workers (dataset_num_proc)",
    "dataloader_pin_memory": "no DataLoader: batches are built in the training process",
    "dataloader_persistent_workers": "no DataLoader: batches are built in the training process",
    "dataloader_prefetch_factor": "no DataLoader: batches are built in the training process",
    "dataloader_multiprocessing_context": "no DataLoader: batches are built in the training process",
    "dataloader_in_order": "no DataLoader: batches are built in the training process",
    "dataloader_drop_last": "every optimizer step is full: the pair order wraps into the next epoch",
    "ignore_bias_buffers": "no DDP wrapper: gradients are all-reduced by the engine",
    "dataset_streaming": "sources are always read in bounded batches",
    "use_liger_kernel": "the fused log-prob head already keeps the logits out of memory",
    "liger_kernel_config": "the fused log-prob head already keeps the logits out of memory",
    "use_cache": "training never uses a KV cache",
    "average_tokens_across_devices": "losses are normalised by the step's global pair count",
    "ddp_find_unused_parameters": "no DDP wrapper: gradients are all-reduced by the engine",
    "ddp_bucket_cap_mb": "no DDP wrapper: gradients are all-reduced by the engine",
    "ddp_broadcast_buffers": "no DDP wrapper: gradients are all-reduced by the engine",
    "ddp_static_graph": "no DDP wrapper: gradients are all-reduced by the engine",
    "ddp_backend": "nccl on CUDA, gloo on the CPU (train.num_processes)",
    "ddp_timeout": "the process group keeps torch's time-out",
    "local_rank": "ranks are set by accelerate launch (train.num_processes)",
    "eval_do_concat_batches": "no Trainer evaluation loop here",
    "eval_use_gather_object": "no Trainer evaluation loop here",
    "eval_accumulation_steps": "no Trainer evaluation loop here",
    "prediction_loss_only": "no Trainer evaluation loop here",
    "batch_eval_metrics": "no Trainer evaluation loop here",
    "include_for_metrics": "no Trainer evaluation loop here",
    "label_names": "no Trainer evaluation loop here",
    "save_on_each_node": "rank 0 writes the checkpoints",
    "save_safetensors": "weights are always safetensors",
    "restore_callback_states_from_checkpoint": "no Trainer callbacks here",
    "hub_token": "nothing is pushed to a hub (push_to_hub)",
    "hub_private_repo": "nothing is pushed to a hub (push_to_hub)",
    "hub_model_id": "nothing is pushed to a hub (push_to_hub); the registered name is registry.model_name",
    "hub_strategy": "nothing is pushed to a hub (push_to_hub)",
    "hub_always_push": "nothing is pushed to a hub (push_to_hub)",
    "hub_revision": "nothing is pushed to a hub (push_to_hub)",
    "torch_empty_cache_steps": "the CUDA cache is left to torch",
    "gradient_checkpointing_kwargs": "checkpointing is always non-reentrant",
    "activation_checkpointing_kwargs": "checkpointing is always non-reentrant",
    "use_logits_to_keep": "the fused head projects only completion positions",
    "bnb_4bit_quant_type": "only with load_in_4bit, which is refused",
    "use_bnb_nested_quant": "only with load_in_4bit, which is refused",
    "bnb_4bit_quant_storage": "only with load_in_4bit, which is refused",
}

_NO_TRAINER = "the engine has no HF Trainer"
# TRL name -> (values that do nothing, why any other value is refused)
NOOP_ONLY: dict[str, tuple[tuple, str]] = {
    "push_to_hub": ((False,), "models are registered in MLflow (registry.model_name), not pushed to a hub"),
    "activation_offloading": ((False,), "activation offloading to the CPU is not implemented; use "
                                        "gradient_checkpointing"),
    "load_in_8bit": ((False,), "quantized (bitsandbytes) base models are not supported"),
    "load_in_4bit": ((False,), "quantized (bitsandbytes) base models are not supported"),
    "pad_token": ((None,), "deprecated in TRL; set the pad token in the tokenizer of the model folder"),
    "bf16_full_eval": ((False,), "evaluation computes under train.precision's autocast"),
    "fp16_full_eval": ((False,), "evaluation computes under train.precision's autocast"),
    "tf32": ((None,), "TF32 matmuls follow torch's default here"),
    "torch_compile_backend": ((None,), "train.compile uses inductor"),
    "torch_compile_mode": ((None,), "train.compile uses inductor's default mode"),
    "neftune_noise_alpha": ((None,), "NEFTune embedding noise is not implemented"),
    "auto_find_batch_size": ((False,), "the batch size is fixed (per_device_train_batch_size)"),
    "optim_args": ((None, ""), "optimizer arguments beyond the adam_* fields are not supported"),
    "optim_target_modules": ((None,), "GaLore/APOLLO optimizers are not supported"),
    "label_smoothing_factor": ((0, 0.0), "DPO's smoothing is label_smoothing"),
    "eval_delay": ((0, 0.0), "periodic evaluation starts at the first eval_steps"),
    "eval_on_start": ((False,), "no evaluation before the first step (the reference is evaluated at the end)"),
    "save_only_model": ((False,), "checkpoints always hold the optimizer state, which resuming needs"),
    "enable_jit_checkpoint": ((False,), _NO_TRAINER),
    "ignore_data_skip": ((False,), "a resumed run always continues the same pair order"),
    "full_determinism": ((False,), "runs are seeded (train.seed); deterministic kernels are not forced"),
    "data_seed": ((None,), "the pair order follows seed (train.seed)"),
    "use_cpu": ((False,), "the device is chosen from what is visible; set CUDA_VISIBLE_DEVICES= for the CPU"),
    "accelerator_config": ((None,), "use train.accelerate_config (an accelerate config file)"),
    "parallelism_config": ((None,), "use train.accelerate_config (an accelerate config file)"),
    "train_sampling_strategy": (("random",), "pairs are drawn in a seeded random order"),
    "group_by_length": ((False,), "pairs are drawn in a seeded random order"),
    "length_column_name": (("length",), "pairs are drawn in a seeded random order"),
    "fsdp": ((None, "", []), "FSDP comes from an accelerate config: train.accelerate_config "
                             "(configs/accelerate/fsdp.yaml)"),
    "fsdp_config": ((None,), "FSDP comes from an accelerate config: train.accelerate_config"),
    "deepspeed": ((None,), "DeepSpeed is not supported; FSDP through train.accelerate_config is"),
    "debug": (("", []), _NO_TRAINER),
    "resume_from_checkpoint": ((None, False), "a re-run under the same run_name resumes from its own last "
                                              "checkpoint by itself; another run's checkpoint cannot be named"),
    "reference_free": ((False,), "use a reference-free loss_type: simpo or orpo"),
    "generate_during_eval": ((False,), "the evaluate stage generates and judges (eval.num_prompts)"),
    "force_use_ref_model": ((False,), "the reference is chosen by reference.source"),
    "ref_adapter_name": ((None,), "the adapter-disabled reference is reference.source adapter_disabled"),
    "model_adapter_name": ((None,), "continue an adapter with peft.adapter_path"),
    "ref_model_init_kwargs": ((None,), "the reference model loads with model_init_kwargs"),
    "max_prompt_length": ((None,), "removed in TRL 1.x and not here: max_length truncates prompt + "
                                   "completion (truncation_mode)"),
    "max_completion_length": ((None,), "removed in TRL 1.x and not here: max_length truncates prompt + "
                                       "completion (truncation_mode)"),
    "padding_value": ((None,), "padding uses the tokenizer's pad token"),
    "label_pad_token_id": ((-100,), "completion masks are built from the validated token ids"),
    "is_encoder_decoder": ((None, False), "encoder-decoder models are not supported"),
    "use_liger_loss": ((None, False), "the fused log-prob head replaces it"),
    "base_model_attribute_name": (("model",), "the decoder body is found at model.base_model_prefix"),
    "tools": ((None,), "tools come from the data's tools column"),
    "datasets": ((None, []), "dataset mixtures are not supported; give one dataset_name (a folder of "
                             "shards is read as one source)"),
    "streaming": ((False,), "dataset mixtures are not supported; sources are always read in batches"),
    "test_split_size": ((None,), "dataset mixtures are not supported; hold out with data.eval_fraction"),
    "env": ((None, {}), "environment variables are not set from a config here; export them before dpo run"),
}

KNOWN: frozenset[str] = frozenset(FIELDS) | frozenset(CONVERTED) | frozenset(IGNORED) | frozenset(NOOP_ONLY)
