"""DPO training against precomputed reference log-probs (no reference model in memory).

A plain loop: micro-batches of pairs, gradient accumulation with the loss normalised by the number
of pairs in the optimizer step (exact under accumulation), AdamW, warmup + linear/cosine schedule,
gradient clipping, atomic checkpoints that a re-run resumes from, and TRL's metric names.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn

from data_contracts.config import LossConfig, TrainConfig
from dpo_engine.forward import pair_logps
from dpo_engine.losses import loss_from_config, pair_metrics


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def total_steps(n_pairs: int, cfg: TrainConfig) -> int:
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * n_pairs / per_step))


def pair_order(n_pairs: int, n_needed: int, seed: int) -> list[int]:
    """Pair indices for the whole run: one seeded permutation per epoch, concatenated."""
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


# ------------------------------------------------------------------------------ checkpoints

def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = [p for p in ckpt_dir.glob("step-*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


def save_checkpoint(ckpt_dir: Path, step: int, model, opt, sched, history: list[dict]) -> None:
    final = ckpt_dir / f"step-{step}"
    tmp = ckpt_dir / f".step-{step}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def load_checkpoint(path: Path, model, opt, sched) -> tuple[int, list[dict]]:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k}
    if unexpected or set(missing) - tied:
        raise TrainingError(f"checkpoint {path} does not match the model "
                            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    blob = torch.load(path / "trainer.pt", weights_only=True)
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    meta = json.loads((path / "state.json").read_text())
    return meta["step"], meta["history"]


# ------------------------------------------------------------------------------ the loop

def train(model: nn.Module, pairs: pd.DataFrame, ref: pd.DataFrame, *, loss_cfg: LossConfig,
          cfg: TrainConfig, pad_id: int, out_dir: Path, device: torch.device | str = "cpu",
          log_fn: Callable[[dict, int], None] | None = None,
          progress: Callable[[int, dict], None] | None = None, keep_checkpoints: int = 2
          ) -> TrainResult:
    """Train ``model`` in place on ``pairs`` (valid.parquet rows) with reference log-probs ``ref``.

    ``log_fn(metrics, step)`` receives TRL-named metrics after every optimizer step; checkpoints go
    to ``out_dir/checkpoints`` every ``cfg.save_steps`` steps and a re-run resumes from the last.
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    ref_map = ref.set_index("example_id")
    missing = set(pairs["example_id"]) - set(ref_map.index)
    if missing:
        raise TrainingError(f"{len(missing)} training examples have no reference log-probs "
                            f"(e.g. {sorted(missing)[0]}); re-run precompute")
    records = pairs.to_dict("records")
    ref_c = torch.tensor(ref_map.loc[pairs["example_id"], "ref_chosen_logps"].to_numpy())
    ref_r = torch.tensor(ref_map.loc[pairs["example_id"], "ref_rejected_logps"].to_numpy())

    bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    steps = total_steps(len(records), cfg)
    order = pair_order(len(records), steps * bs * accum, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                            betas=(cfg.adam_beta1, cfg.adam_beta2))
    sched = make_scheduler(opt, cfg, steps)
    use_bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")

    ckpt_dir = out_dir / "checkpoints"
    start, history = 0, []
    last = _latest_checkpoint(ckpt_dir)
    if last is not None:
        start, history = load_checkpoint(last, model, opt, sched)
    model.train()
    for step in range(start, steps):
        t0 = time.perf_counter()
        idx = order[step * bs * accum:(step + 1) * bs * accum]
        n_pairs = len(idx)
        outs, tokens = [], 0
        for m0 in range(0, n_pairs, bs):
            mb = idx[m0:m0 + bs]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                fw = pair_logps(model, [records[i] for i in mb], pad_id, loss_cfg=loss_cfg,
                                chunk_size=cfg.logit_chunk_size, with_stats=True, device=device)
            tokens += fw["batch"].num_tokens
            pc, pr, seq = fw["chosen"], fw["rejected"], fw["seq"]
            out = loss_from_config(loss_cfg, pc, pr, ref_c[mb].to(device), ref_r[mb].to(device),
                                   ld_weighted=fw["ld_weighted"], **fw["loss_inputs"])
            (out.losses.sum() / n_pairs).backward()  # normalised by the pairs of the whole step
            outs.append((out, pc.detach(), pr.detach(), seq))
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        loss_val = sum(o[0].losses.sum().item() for o in outs) / n_pairs
        if not math.isfinite(loss_val) or not torch.isfinite(grad_norm):
            raise TrainingError(f"non-finite loss/gradient at step {step + 1} (loss={loss_val}, "
                                f"grad_norm={grad_norm.item()}); last good checkpoint kept in {ckpt_dir}")
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        metrics = _step_metrics(outs, grad_norm.item(), lr, tokens, time.perf_counter() - t0)
        metrics["step"] = step + 1
        history.append(metrics)
        if log_fn:
            log_fn({k: v for k, v in metrics.items() if k != "step"}, step + 1)
        if progress:
            progress(step + 1, metrics)
        if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < steps:
            save_checkpoint(ckpt_dir, step + 1, model, opt, sched, history)
            for old in sorted(ckpt_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[
                    :-keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    return TrainResult(steps=steps, history=history, resumed_from=start)


def _step_metrics(outs, grad_norm: float, lr: float, tokens: int, seconds: float) -> dict:
    from dpo_engine.losses import PairLoss

    cat = PairLoss(torch.cat([o[0].losses.detach() for o in outs]),
                   torch.cat([o[0].chosen_rewards for o in outs]),
                   torch.cat([o[0].rejected_rewards for o in outs]))
    pc = torch.cat([o[1] for o in outs])
    pr = torch.cat([o[2] for o in outs])
    m = pair_metrics(cat, pc, pr)
    ent = sum(o[3]["entropy_sum"].sum().item() for o in outs)
    ml_c = sum(o[3]["mean_logit_sum"][:len(o[1])].sum().item() for o in outs)
    ml_r = sum(o[3]["mean_logit_sum"][len(o[1]):].sum().item() for o in outs)
    n_c = sum(o[3]["n_tokens"][:len(o[1])].sum().item() for o in outs)
    n_r = sum(o[3]["n_tokens"][len(o[1]):].sum().item() for o in outs)
    m.update({
        "logits/chosen": ml_c / max(1, n_c), "logits/rejected": ml_r / max(1, n_r),
        "entropy": ent / max(1, n_c + n_r), "num_tokens": float(tokens), "grad_norm": grad_norm,
        "learning_rate": lr, "tokens_per_second": tokens / max(seconds, 1e-9),
    })
    return m
