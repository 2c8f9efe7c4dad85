"""What a training step reports: its metrics (TRL's names), peak memory, MFU, and what is logged.

A step's metrics come from every micro-batch's record (``step_record``), gathered over ranks
(``gather_records``) so that they cover all the step's pairs; ``logged_metrics`` averages them over
the logging window as TRL does.
"""

from __future__ import annotations

import itertools
import sys

import torch
import torch.distributed as dist

from data_contracts.config import TrainConfig
from dpo_engine.modeling import PairLoss, pair_metrics

# Dense bf16 peak TFLOP/s of one GPU, matched on a substring of its name (first match wins).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
               "L4": 121.0, "A10": 125.0, "V100": 125.0, "T4": 65.0}


def peak_tflops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the start; elsewhere: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # resource is POSIX only
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB on Linux
        return kb / 2**20 if sys.platform == "darwin" else kb / 1024
    except ImportError:  # Windows: psutil instead
        import psutil
        return psutil.Process().memory_info().peak_wset / 2**20


def mfu(n_params: int, tokens: int, seconds: float, peak: float | None, n_devices: int) -> float | None:
    """6·N·tokens / (seconds · peak FLOP/s of all devices): the usual dense-training estimate."""
    if not peak:
        return None
    return 6 * n_params * tokens / (max(seconds, 1e-9) * peak * 1e12 * n_devices)


# Metrics that are a running total or a high-water mark: logged as of the logging step, not averaged.
LAST_VALUE_METRICS = ("num_tokens", "peak_memory_mb", "learning_rate", "loss_scale")


def logged_metrics(history: list[dict], every: int) -> dict[str, float]:
    """What ``log_fn`` gets at a logging step, as TRL logs: each metric's mean over the steps since
    the previous logging step (``every`` steps, fewer at the end), totals and peaks as of now, and
    eval/ metrics as last evaluated in that window."""
    step = history[-1]["step"]
    first = step - (step - 1) % every  # the window's first step; read from the end: constant per step
    window = list(reversed(list(itertools.takewhile(lambda h: h["step"] >= first, reversed(history)))))
    out: dict[str, float] = {}
    for name in dict.fromkeys(k for h in window for k in h):
        values = [h[name] for h in window if name in h]
        if name == "step":
            continue
        out[name] = values[-1] if name in LAST_VALUE_METRICS or name.startswith("eval/") else \
            sum(values) / len(values)
    return out


def step_record(out, pc, pr, seq) -> dict:
    """What a micro-batch contributes to the step's metrics (detached, on the CPU)."""
    b = len(pc)
    return {"losses": out.losses.detach().cpu(), "chosen_rewards": out.chosen_rewards.detach().cpu(),
            "rejected_rewards": out.rejected_rewards.detach().cpu(), "pc": pc.cpu(), "pr": pr.cpu(),
            "entropy": seq["entropy_sum"].sum().item(),
            "logit_c": seq["mean_logit_sum"][:b].sum().item(), "logit_r": seq["mean_logit_sum"][b:].sum().item(),
            "correct_c": seq["correct_sum"][:b].sum().item(),
            "n_c": seq["n_tokens"][:b].sum().item(), "n_r": seq["n_tokens"][b:].sum().item()}


def gather_records(outs: list[dict], n_ranks: int) -> list[dict]:
    """Every rank's micro-batch records, in rank order: the step's metrics cover all its pairs."""
    everyone: list = [None] * n_ranks
    dist.all_gather_object(everyone, outs)
    return [o for rank_outs in everyone for o in rank_outs]


def step_metrics(outs, grad_norm: float, lr: float, tokens: int, seconds: float) -> dict:
    cat = PairLoss(torch.cat([o["losses"] for o in outs]), torch.cat([o["chosen_rewards"] for o in outs]),
                   torch.cat([o["rejected_rewards"] for o in outs]))
    m = pair_metrics(cat, torch.cat([o["pc"] for o in outs]), torch.cat([o["pr"] for o in outs]))
    ent = sum(o["entropy"] for o in outs)
    ml_c, ml_r = sum(o["logit_c"] for o in outs), sum(o["logit_r"] for o in outs)
    n_c, n_r = sum(o["n_c"] for o in outs), sum(o["n_r"] for o in outs)
    m.update({
        "logits/chosen": ml_c / max(1, n_c), "logits/rejected": ml_r / max(1, n_r),
        "entropy": ent / max(1, n_c + n_r), "num_tokens": float(tokens), "grad_norm": grad_norm,
        # TRL: top-1 accuracy of the policy over the chosen completion tokens
        "mean_token_accuracy": sum(o["correct_c"] for o in outs) / max(1, n_c),
        "learning_rate": lr, "tokens_per_second": tokens / max(seconds, 1e-9),
    })
    return m
