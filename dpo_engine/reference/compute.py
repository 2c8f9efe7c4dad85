"""The reference model's summed completion log-probs of every chosen and rejected sequence, computed
once in inference mode over length-sorted batches (little padding), through the fused head."""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch
from torch import nn

from data_contracts.images import row_refs
from dpo_engine.modeling import autocast, autocast_dtype, collate, ld_token_weights, sequence_logps


@torch.inference_mode()
def compute_reference_logps(model: nn.Module, rows: pd.DataFrame, *, pad_id: int, batch_size: int,
                            chunk_size: int = 8192, device: torch.device | str = "cpu",
                            ld_alpha: float | None = None, precision: str = "auto",
                            progress: Callable[[int], None] | None = None, vision=None) -> pd.DataFrame:
    """Summed completion log-probs of every chosen and rejected sequence, in length-sorted batches
    (LD-DPO-weighted when ``ld_alpha`` is given, as the policy's are), under the autocast of
    ``precision`` (train.precision: the reference computes as the policy will). ``vision``: a
    vision-language model's ``VisionInputs``: each sequence gets its pair's images."""
    model.eval()
    device = torch.device(device)
    amp = autocast_dtype(precision, device)
    seqs = []  # (row position, side, prompt ids, completion ids, shorter completion of the pair, images)
    for i, r in enumerate(rows.itertuples(index=False)):
        m, refs = min(len(r.chosen_input_ids), len(r.rejected_input_ids)), row_refs(r)
        if refs and vision is None:
            raise ValueError("the rows hold images: pass vision=VisionInputs(processor, model)")
        seqs.append((i, 0, r.prompt_input_ids, r.chosen_input_ids, m, refs))
        seqs.append((i, 1, r.prompt_input_ids, r.rejected_input_ids, m, refs))
    seqs.sort(key=lambda s: len(s[2]) + len(s[3]))
    logps = torch.zeros(len(rows), 2, dtype=torch.float64)
    counts = torch.zeros(len(rows), 2, dtype=torch.long)
    for b0 in range(0, len(seqs), batch_size):
        chunk = seqs[b0:b0 + batch_size]
        batch = collate([s[2] for s in chunk], [s[3] for s in chunk], pad_id)
        if vision is not None:
            batch.extras = vision.inputs([s[5] for s in chunk], batch.input_ids) or None
        batch = batch.to(device)
        weights = None if ld_alpha is None else \
            ld_token_weights(batch, torch.tensor([s[4] for s in chunk]), ld_alpha)
        with autocast(amp, device):
            out = sequence_logps(model, batch, chunk_size=chunk_size, token_weights=weights)
        for k, s in enumerate(chunk):
            logps[s[0], s[1]] = out["logps"][k].double().cpu()
            counts[s[0], s[1]] = out["n_tokens"][k].cpu()
        if progress:
            progress(len(chunk))
    return pd.DataFrame({
        "example_id": rows["example_id"].tolist(),
        "ref_chosen_logps": logps[:, 0].numpy(), "ref_rejected_logps": logps[:, 1].numpy(),
        "chosen_tokens": counts[:, 0].numpy(), "rejected_tokens": counts[:, 1].numpy(),
    })
