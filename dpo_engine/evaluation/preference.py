"""Held-out preference metrics of a policy against the cached reference log-probs (TRL's names,
prefixed ``eval/``): loss, rewards, margins, accuracy."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from data_contracts.config import LossConfig
from dpo_engine.modeling import autocast, autocast_dtype, loss_from_config, pair_logps, pair_metrics
from dpo_engine.training.distributed import world


@torch.inference_mode()
def preference_metrics(model: nn.Module, pairs: pd.DataFrame, ref: pd.DataFrame, *,
                       loss_cfg: LossConfig, pad_id: int, batch_size: int, chunk_size: int = 8192,
                       device: torch.device | str = "cpu", precision: str = "auto", vision=None) -> dict[str, float]:
    """Loss, rewards, margins and accuracy of the policy on held-out pairs, TRL names, ``eval/``
    (under the autocast of train.precision, as training and the reference precompute); ``vision``:
    a vision-language model's ``VisionInputs``. A progress bar (pairs, ETA) on rank 0; inside the
    training bar (periodic evaluation) it is cleared when done."""
    model.eval()
    amp = autocast_dtype(precision, device)
    ref_map = ref.set_index("example_id")
    records = pairs.to_dict("records")
    pcs, prs, inputs, ld = [], [], {}, False
    with tqdm(total=len(records), desc="eval preference", unit="pair", leave=None,
              disable=world()[0] != 0) as bar:
        for b0 in range(0, len(records), batch_size):
            batch = records[b0:b0 + batch_size]
            with autocast(amp, device):
                fw = pair_logps(model, batch, pad_id, loss_cfg=loss_cfg, chunk_size=chunk_size,
                                device=device, vision=vision)
            pcs.append(fw["chosen"].double().cpu())
            prs.append(fw["rejected"].double().cpu())
            for k, v in fw["loss_inputs"].items():
                inputs.setdefault(k, []).append(v.double().cpu() if v.is_floating_point() else v.cpu())
            ld = fw["ld_weighted"]
            bar.update(len(batch))
    pc, pr = torch.cat(pcs), torch.cat(prs)
    rc = torch.tensor(ref_map.loc[pairs["example_id"], "ref_chosen_logps"].to_numpy())
    rr = torch.tensor(ref_map.loc[pairs["example_id"], "ref_rejected_logps"].to_numpy())
    out = loss_from_config(loss_cfg, pc, pr, rc, rr, ld_weighted=ld,
                           **{k: torch.cat(v) for k, v in inputs.items()})
    return pair_metrics(out, pc, pr, prefix="eval/")
