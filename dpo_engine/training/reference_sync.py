"""TR-DPO (``reference.sync_ref_model``): an online reference model that moves towards the policy
every ``ref_model_sync_steps`` steps."""

from __future__ import annotations

import torch
from torch import nn

from data_contracts.config import ReferenceConfig
from dpo_engine.modeling import is_peft
from dpo_engine.training.distributed import unwrap_ddp
from dpo_engine.training.errors import TrainingError


def tr_dpo_settings(model, ref, ref_cfg: ReferenceConfig | None) -> tuple[float, int] | None:
    """(alpha, sync steps) when TR-DPO is on, after checking the reference can follow the policy."""
    if ref_cfg is None or not ref_cfg.sync_ref_model:
        return None
    if not isinstance(ref, nn.Module):
        raise TrainingError("reference.sync_ref_model needs an online reference model "
                            "(reference.source=model), not precomputed log-probs or the adapter-disabled policy")
    pol = [(n, p.shape) for n, p in unwrap_ddp(model).named_parameters()]
    if is_peft(model) or pol != [(n, p.shape) for n, p in ref.named_parameters()]:
        raise TrainingError("reference.sync_ref_model: the reference model must have exactly the policy's "
                            "parameters (same architecture, no PEFT adapter on the policy) to be mixed with it")
    return ref_cfg.ref_model_mixup_alpha, ref_cfg.ref_model_sync_steps


@torch.no_grad()
def sync_reference(policy: nn.Module, ref_model: nn.Module, alpha: float) -> None:
    """TR-DPO's soft update (TRL's SyncRefModelCallback): ref = alpha * policy + (1 - alpha) * ref,
    parameter by parameter, in place."""
    for rp, pp in zip(ref_model.parameters(), unwrap_ddp(policy).parameters()):
        rp.mul_(1.0 - alpha).add_(pp.detach().to(rp.dtype), alpha=alpha)
