"""The optimizer and its schedule: steps in a run, pair order, AdamW (or 8-bit AdamW), warmup +
linear/cosine/constant learning rate, and fp16 loss scaling."""

from __future__ import annotations

import math

import torch

from data_contracts.config import TrainConfig
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


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    warmup = int(round(cfg.warmup_ratio * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if cfg.lr_scheduler_type == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1 - progress)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def check_optim(cfg: TrainConfig, device: torch.device | str) -> None:
    """Fail before any model is loaded when ``train.optim`` cannot run here."""
    if cfg.optim != "adamw_8bit":
        return
    if torch.device(device).type != "cuda":
        raise TrainingError(f"train.optim: adamw_8bit needs a CUDA device (training runs on {device}); "
                            "use adamw_torch")
    try:  # bitsandbytes is an optional dependency (CUDA only)
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainingError("train.optim: adamw_8bit needs the bitsandbytes package "
                            "(pip install bitsandbytes); use adamw_torch") from None


MAX_OVERFLOW_SKIPS = 25  # fp16: more consecutive overflowing steps than this is a diverged run


def make_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 (disabled: every call is a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=enabled)


def make_optimizer(params: list[torch.Tensor], cfg: TrainConfig, device) -> torch.optim.Optimizer:
    check_optim(cfg, device)
    kw = dict(lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2))
    if cfg.optim == "adamw_8bit":  # optional dependency, checked by check_optim
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)
