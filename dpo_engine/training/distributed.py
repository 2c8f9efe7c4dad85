"""Training under torch.distributed: the process group, gradients summed over ranks, and FSDP.

Under ``accelerate launch`` each rank takes its share of every step's pairs and the gradients are
summed over ranks (``all_reduce_grads``), each rank's loss being normalised by the step's global pair
count: the update equals the single-process one. Launched with an FSDP accelerate config
(``fsdp_settings``), the policy is sharded with FSDP2's ``fully_shard`` (``fsdp_wrap``) with the same
update; its full weights are gathered for checkpoints (``gather_fsdp_state``) and put back into the
plain policy after training (``unshard_in_place``).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from data_contracts.config import TrainConfig
from dpo_engine.modeling import unwrap_model
from dpo_engine.training.errors import TrainingError


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fsdp_settings() -> dict | None:
    """The FSDP settings that ``accelerate launch`` puts in every rank's environment for an accelerate
    config with ``distributed_type: FSDP`` (None without one)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("1", "true"):
        return None
    return {"version": os.environ.get("FSDP_VERSION", "1"),
            "layers": [c for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()],
            "reshard": os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in
            ("false", "0", "shard_grad_op", "no_shard"),
            "offload": os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"}


def check_fsdp(cfg: TrainConfig, sync, evaluate_fn) -> None:
    for bad, why in ((sync is not None, "reference.sync_ref_model (TR-DPO mixes full weights)"),
                     (evaluate_fn is not None and cfg.eval_steps > 0, "train.eval_steps (periodic evaluation)"),
                     (cfg.precision == "fp16", "train.precision=fp16 (loss scaling of sharded gradients); "
                                               "use bf16")):
        if bad:
            raise TrainingError(f"FSDP (train.accelerate_config) does not support {why} yet")


class FSDPRoot(nn.Module):
    """FSDP's root unit around the policy. The fused head calls the body and reads the LM head's
    weight itself, not through the model's forward, so the whole log-prob computation runs inside this
    module's forward, where FSDP has gathered the root-level parameters (embeddings, final norm, head)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, fn, *args, **kwargs):
        return fn(self.lm, *args, **kwargs)


def unwrap_fsdp(model: nn.Module) -> nn.Module:
    return model.lm if isinstance(model, FSDPRoot) else model


def fsdp_wrap(model: nn.Module, fsdp: dict) -> FSDPRoot:
    """FSDP2 (``fully_shard``): each transformer layer (the config's ``fsdp_transformer_layer_cls_to_wrap``,
    else the model's ``_no_split_modules``) is a unit, the rest is the root unit. FSDP averages the
    gradients over ranks (gloo has no pre-scaled sum), so each rank's loss is normalised by the step's
    global pairs / world size: the same sum as the replicated path."""
    # FSDP's modules are imported by FSDP runs only: half a second of start-up otherwise
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if fsdp["version"] != "2":
        raise TrainingError("FSDP: set fsdp_config.fsdp_version: 2 in train.accelerate_config "
                            "(this trainer shards with FSDP2's fully_shard)")
    names = set(fsdp["layers"]) or set(getattr(unwrap_model(model), "_no_split_modules", None) or [])
    kw = {"reshard_after_forward": fsdp["reshard"],
          "offload_policy": CPUOffloadPolicy() if fsdp["offload"] else OffloadPolicy()}
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise TrainingError(f"FSDP: no module of class {', '.join(sorted(names)) or '?'} in the model; set "
                            "fsdp_config.fsdp_transformer_layer_cls_to_wrap to its decoder layer class")
    for layer in layers:
        fully_shard(layer, **kw)
    root = FSDPRoot(model)
    fully_shard(root, **kw)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # chosen/rejected are slices
    return root


def gather_fsdp_state(root: FSDPRoot, opt) -> tuple[dict, dict]:
    """Full (model, optimizer) state dicts on rank 0 (empty elsewhere), keyed like the policy's own."""
    # FSDP runs only (see fsdp_wrap)
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {k.removeprefix("lm."): v for k, v in get_model_state_dict(root, options=options).items()}
    return weights, get_optimizer_state_dict(root, opt, options=options)


def unshard_in_place(root: FSDPRoot) -> None:
    """After training: the full weights gathered (all ranks take part) and put back into the policy as
    plain parameters on rank 0, which exports it; tied parameters stay tied."""
    # FSDP runs only (see fsdp_wrap)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:  # ranks > 0
        return
    done: dict[int, nn.Parameter] = {}
    for name, p in list(root.lm.named_parameters(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        module = root.lm.get_submodule(owner)
        if id(p) not in done:
            done[id(p)] = nn.Parameter(full[f"lm.{name}"].to(p.device), requires_grad=p.requires_grad)
        module._parameters[leaf] = done[id(p)]


def agree(flag: bool, n_ranks: int) -> bool:
    """Rank 0's decision on every rank (a stop rule may read what only rank 0 sees)."""
    if n_ranks == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def unwrap_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum gradients over ranks (a missing gradient counts as zero)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
