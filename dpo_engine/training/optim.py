"""The optimizer and its schedule: steps in a run, pair order, the optimizer by its TRL/transformers
name (AdamW, fused AdamW, Adafactor, SGD, bitsandbytes 8-bit...), the learning-rate schedule from
``transformers.get_scheduler``, and fp16 loss scaling."""

from __future__ import annotations

import math

import torch

from data_contracts.config import TrainConfig
from data_contracts.config.train import BNB_OPTIMIZERS
from dpo_engine.training.distributed import world
from dpo_engine.training.errors import TrainingError


def total_steps(n_pairs: int, cfg: TrainConfig) -> int:
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world()[1]
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * n_pairs / per_step))


def pair_order(n_pairs: int, n_needed: int, seed: int) -> list[int]:
    """Pair indices for the whole run: one seeded permutation per epoch, concatenated."""
    if n_pairs <= 0:  # no permutation would ever add an index: the loop below would never end
        raise TrainingError(f"no training pairs: {n_pairs} pairs to fill {n_needed} positions of the "
                            "run; the train split is empty (see the validate stage's train/report.json)")
    order: list[int] = []
    epoch = 0
    while len(order) < n_needed:
        g = torch.Generator().manual_seed(seed + epoch)
        order += torch.randperm(n_pairs, generator=g).tolist()
        epoch += 1
    return order[:n_needed]


def warmup_steps(cfg: TrainConfig, steps: int) -> int:
    """transformers' ``TrainingArguments.get_warmup_steps``: ``warmup_steps`` when > 0, else
    ``ceil(warmup_ratio * steps)``."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(steps * cfg.warmup_ratio)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    """The learning-rate schedule of ``train.lr_scheduler_type`` over ``steps`` optimizer steps, made by
    ``transformers.get_scheduler`` as the HF Trainer (and so TRL) makes it: the same factor at every
    step, warmup included (from 0; ``constant`` has none)."""
    from transformers import get_scheduler

    try:
        return get_scheduler(cfg.lr_scheduler_type, opt, num_warmup_steps=warmup_steps(cfg, steps),
                             num_training_steps=steps,
                             scheduler_specific_kwargs=dict(cfg.lr_scheduler_kwargs) or None)
    except (TypeError, ValueError) as e:  # e.g. polynomial's lr_end not below learning_rate
        raise TrainingError(f"train.lr_scheduler_type={cfg.lr_scheduler_type} (train.lr_scheduler_kwargs="
                            f"{dict(cfg.lr_scheduler_kwargs)}): {str(e).splitlines()[0] if str(e) else e}") \
            from None


def check_optim(cfg: TrainConfig, device: torch.device | str) -> None:
    """Fail before any model is loaded when ``train.optim`` cannot run here."""
    if cfg.optim not in BNB_OPTIMIZERS:
        return
    if torch.device(device).type != "cuda":
        raise TrainingError(f"train.optim: {cfg.optim} needs a CUDA device (training runs on {device}); "
                            "use adamw_torch")
    try:  # bitsandbytes is an optional dependency (CUDA only)
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainingError(f"train.optim: {cfg.optim} needs the bitsandbytes package "
                            "(pip install bitsandbytes); use adamw_torch") from None


MAX_OVERFLOW_SKIPS = 25  # fp16: more consecutive overflowing steps than this is a diverged run


def make_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 (disabled: every call is a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=enabled)


def make_optimizer(params: list[torch.Tensor], cfg: TrainConfig, device) -> torch.optim.Optimizer:
    """``train.optim`` by its TRL/transformers name, with the arguments the HF Trainer gives it
    (``Trainer.get_optimizer_cls_and_kwargs``)."""
    check_optim(cfg, device)
    lr, wd = cfg.learning_rate, cfg.weight_decay
    adam = dict(lr=lr, weight_decay=wd, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    if cfg.optim in BNB_OPTIMIZERS:  # optional dependency, checked by check_optim
        import bitsandbytes as bnb
        cls = {"adamw_8bit": bnb.optim.AdamW8bit, "adamw_bnb_8bit": bnb.optim.AdamW8bit,
               "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW}
        return cls[cfg.optim](params, **adam)
    if cfg.optim == "adafactor":  # a fixed learning rate from the schedule, as the HF Trainer sets it
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False)
    if cfg.optim in ("sgd", "adagrad", "rmsprop"):
        cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}
        return cls[cfg.optim](params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, **adam, fused=cfg.optim == "adamw_torch_fused" or None)
