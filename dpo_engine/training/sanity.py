"""The step-1 reference check: a reference that is the starting policy gives log-ratios of 0.

When the reference is the policy before any update (log-probs precomputed from the same weights, the
same weights run online, or the policy with a fresh, identity adapter switched off), every sequence's
log-ratio ``log pi(y|x) - log pi_ref(y|x)`` at the first optimizer step is 0 up to rounding: the
rewards are 0 and the sigmoid loss of every pair is ln 2. A larger difference means the two sides did
not score the same tokens the same way (another tokenization, chat template or truncation, another
precision or dtype between precompute and training, a cache made for another model): the most common
silent DPO bug, which otherwise trains on a garbage baseline. ``StartCheck`` collects the step's
micro-batches and stops the run with one line saying so.

The tolerance, per completion token (``|policy - reference| / tokens`` of each sequence), comes from the
unit roundoff ``u`` of the precision the forward passes compute in: ``max(1e-3, 16 u)`` nats, i.e.
1e-3 for fp32 (u = 2^-24), 7.8e-3 for fp16 and TF32 matmuls (u = 2^-11) and 6.25e-2 for bf16
(u = 2^-8). The policy and the reference pass differ only in batch shape (other padding, packing,
other rows beside a sequence), which changes the order of floating-point sums: each token's
log-prob (a logit minus a log-sum-exp of logits of size 10-30) moves by a few ``u`` of the logit
scale at worst, with either sign. 16 u per token (and 1e-3, about 10^4 u, for fp32, where
transcendental functions and attention kernels dominate) is well above that: measured on 2 CPU cores,
an honest fp32 step 1 stays below 1e-5 nats per token (notes/h-best-README.md), while a wrong template
or tokenization moves completions by tenths of a nat per token or more.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from data_contracts.config import REFERENCE_FREE_LOSSES, LossConfig, RunConfig
from dpo_engine.modeling import reference_model_path
from dpo_engine.training.errors import TrainingError

LN2 = math.log(2.0)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
NO_REFERENCE_LOSSES = REFERENCE_FREE_LOSSES | {"sft"}  # losses that never read the reference

LIKELY_CAUSES = ("the reference was computed differently from the policy: tokenization, chat template, "
                 "truncation (data.max_length, data.truncation_mode) or precision/dtype differing between "
                 "precompute and training, or a reference cache made for another model")


def reference_is_start(cfg: RunConfig, model_path: str) -> tuple[bool, str]:
    """(True, '') when the train stage's reference should equal its starting policy (what
    ``train(reference_is_start=...)`` takes), else (False, why not). ``model_path``: the policy's
    resolved folder. Conditions the loop sees itself (a resume, active dropout) are checked there."""
    if not cfg.train.check_reference_at_start:
        return False, "train.check_reference_at_start=false"
    if not set(cfg.loss.loss_types) - NO_REFERENCE_LOSSES:
        return False, f"loss.loss_type {cfg.loss.loss_type} does not use the reference"
    if cfg.reference.source != "adapter_disabled" and Path(reference_model_path(
            cfg.reference.model_path, model_path)).resolve() != Path(model_path).resolve():
        return False, f"reference.model_path {cfg.reference.model_path} is another model than the policy"
    if cfg.peft.enabled and cfg.peft.adapter_path:
        return False, "the policy starts from a trained adapter (peft.adapter_path)"
    inits = {k: v for k, v in cfg.peft.extra.items() if k.startswith("init") and v is not True}
    if cfg.peft.enabled and inits:  # peft's init_*=True makes every adapter type start as the identity
        return False, f"the adapter does not start as the identity (peft.extra {inits})"
    return True, ""


def runtime_skip(model: nn.Module, resumed_from: int, dropout_off: bool = True) -> str | None:
    """Why the check cannot hold in this training (None: it must): a resume, or noise in the policy's
    forward that the reference pass does not have (active dropout, router jitter). ``dropout_off``:
    ``train.disable_dropout`` (else the model config's dropout rates count too)."""
    if resumed_from:
        return f"resumed from step {resumed_from}"
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and m.p > 0 and m.training and ".lora_dropout." not in f".{name}.":
            return f"dropout is active in the policy ({name}, p={m.p}; train.disable_dropout)"
        noise = getattr(getattr(m, "config", None), "router_jitter_noise", 0) or 0
        if noise > 0:
            return f"router jitter noise {noise} in the policy's forward"
    config = getattr(model, "config", None)
    rates = {k: v for k, v in (vars(config) if config is not None else {}).items()
             if ("dropout" in k or k.endswith("pdrop")) and isinstance(v, float) and v > 0}
    if not dropout_off and rates:
        return f"dropout is active in the policy (config {rates}; train.disable_dropout=false)"
    return None


def compute_dtype(model: nn.Module, amp: torch.dtype | None, device: torch.device) -> torch.dtype:
    """The precision the forward passes round to: the autocast dtype, else the weights' lowest; fp32
    matmuls on CUDA that run as TF32 count as float16 (the same 10-bit mantissa)."""
    if amp is not None:
        return amp
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    dtype = max(dtypes, key=lambda d: UNIT_ROUNDOFF.get(d, 0.0)) if dtypes else torch.float32
    if dtype == torch.float32 and device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return torch.float16
    return dtype


def tolerance(dtype: torch.dtype) -> float:
    """Nats per completion token (module docstring): ``max(1e-3, 16 u)``."""
    return max(1e-3, 16 * UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF[torch.bfloat16]))


class StartCheck:
    """Step 1's log-ratios, added micro-batch by micro-batch (``add``), then ``verify``."""

    def __init__(self, loss_cfg: LossConfig, dtype: torch.dtype):
        self.loss_cfg, self.dtype, self.tol = loss_cfg, dtype, tolerance(dtype)
        self.rows: list[tuple[float, str, str, float, float, int]] = []  # per token, id, side, pol, ref, n
        self.loss_dev, self.loss_bad = 0.0, 0  # the sigmoid loss: largest |loss - ln 2|, pairs beyond bound
        self.rewards = [0.0, 0.0]
        types = loss_cfg.loss_types
        # the plain sigmoid loss (cDPO included) is w * ln 2 at log-ratios of 0
        self.ln2 = LN2 * loss_cfg.weights[0] if types == ["sigmoid"] and not loss_cfg.use_weighting else None
        self.rewarded = types[0] not in REFERENCE_FREE_LOSSES  # rewards are beta * log-ratio

    def add(self, ids: list[str], out, pc, pr, rc, rr, n_tokens: torch.Tensor) -> None:
        b = len(ids)
        n = n_tokens.detach().cpu().long().clamp(min=1)
        ratio = {}
        for side, pol, ref, lens in (("chosen", pc, rc, n[:b]), ("rejected", pr, rr, n[b:])):
            pol, ref = pol.detach().double().cpu(), ref.detach().double().cpu()
            ratio[side] = (pol - ref).abs()
            self.rows += [(float(ratio[side][i]) / int(lens[i]), ids[i], side, float(pol[i]), float(ref[i]),
                           int(lens[i])) for i in range(b)]
        self.rewards[0] += float(out.chosen_rewards.sum())
        self.rewards[1] += float(out.rejected_rewards.sum())
        if self.ln2 is not None:  # softplus is 1-Lipschitz: within beta * (|chosen| + |rejected| ratios) of ln 2
            dev = (out.losses.detach().double().cpu() - self.ln2).abs()
            bound = self.loss_cfg.beta * self.tol * (n[:b] + n[b:]).double() + 1e-6
            self.loss_dev = max(self.loss_dev, float(dev.max()))
            self.loss_bad += int((dev > bound).sum())

    def verify(self, n_ranks: int = 1) -> dict:
        """Raise TrainingError when a sequence's log-ratio exceeds the tolerance (or, for the sigmoid
        loss, a pair's loss is further from ln 2 than log-ratios within it allow); every rank raises
        alike. Returns what was measured."""
        mine = (max(self.rows, default=(0.0, "", "", 0.0, 0.0, 1)), len(self.rows),
                sum(r[0] > self.tol for r in self.rows), self.loss_dev, self.loss_bad, self.rewards)
        everyone = [mine]
        if n_ranks > 1:
            everyone = [None] * n_ranks
            dist.all_gather_object(everyone, mine)
        worst = max(e[0] for e in everyone)
        n_seq, over, loss_bad = (sum(e[j] for e in everyone) for j in (1, 2, 4))
        pairs = max(1, n_seq // 2)
        rc, rr = (sum(e[5][j] for e in everyone) / pairs for j in (0, 1))
        found = {"max_nats_per_token": worst[0], "tolerance": self.tol, "precision": str(self.dtype).split(".")[-1],
                 "sequences": n_seq, "over_tolerance": over}
        if self.rewarded:
            found.update({"rewards/chosen": rc, "rewards/rejected": rr})
        if self.ln2 is not None:
            found["max_loss_minus_ln2"] = max(e[3] for e in everyone)
        if over or loss_bad:
            _, ex, side, pol, ref, k = worst
            rewards = f"; mean rewards chosen {rc:+.4g} / rejected {rr:+.4g}, not 0" if self.rewarded else ""
            loss = f"; sigmoid loss up to {found['max_loss_minus_ln2']:.4g} from ln 2" if self.ln2 is not None else ""
            raise TrainingError(
                f"reference check at step 1: the policy's log-probs differ from the reference's by up to "
                f"{worst[0]:.4g} nats per token ({over} of {n_seq} sequences over the {found['precision']} "
                f"tolerance {self.tol:.3g}; worst: example {ex} {side}, policy {pol:.4f} vs reference {ref:.4f} "
                f"over {k} tokens{rewards}{loss}), although the reference should be the starting policy: "
                f"{LIKELY_CAUSES}; re-run precompute with the training's data and model settings, or set "
                f"train.check_reference_at_start=false if the reference is meant to differ")
        return found
