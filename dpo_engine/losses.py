"""DPO losses from per-sequence log-probs, and the metrics TRL users know.

Notation (TRL): c = policy_chosen - ref_chosen, r = policy_rejected - ref_rejected (sums of
completion-token log-probs), delta = c - r, beta = loss.beta, eps = loss.label_smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLoss:
    losses: torch.Tensor  # [B] per-pair loss
    chosen_rewards: torch.Tensor  # [B] beta * c, detached
    rejected_rewards: torch.Tensor  # [B] beta * r, detached


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, loss_type: str = "sigmoid",
             beta: float = 0.1, label_smoothing: float = 0.0,
             chosen_len: torch.Tensor | None = None,
             rejected_len: torch.Tensor | None = None) -> PairLoss:
    c = policy_chosen - ref_chosen.to(policy_chosen)
    r = policy_rejected - ref_rejected.to(policy_rejected)
    delta = c - r
    if loss_type == "sigmoid":  # eps > 0 gives conservative DPO (cDPO)
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_len is None or rejected_len is None:
            raise ValueError("loss_type=ipo needs completion token counts")
        lc = chosen_len.to(c).clamp(min=1)
        lr = rejected_len.to(r).clamp(min=1)
        losses = (c / lc - r / lr - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return PairLoss(losses, (beta * c).detach(), (beta * r).detach())


def pair_metrics(out: PairLoss, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                 prefix: str = "") -> dict[str, float]:
    """TRL's metric names and definitions (batch means; accuracy is strict)."""
    cr, rr = out.chosen_rewards, out.rejected_rewards
    return {
        f"{prefix}loss": out.losses.mean().item(),
        f"{prefix}rewards/chosen": cr.mean().item(),
        f"{prefix}rewards/rejected": rr.mean().item(),
        f"{prefix}rewards/margins": (cr - rr).mean().item(),
        f"{prefix}rewards/accuracies": (cr > rr).float().mean().item(),
        f"{prefix}logps/chosen": policy_chosen.detach().mean().item(),
        f"{prefix}logps/rejected": policy_rejected.detach().mean().item(),
    }
