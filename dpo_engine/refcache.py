"""Reference log-prob precomputation, cached to Parquet.

The reference model runs once, in inference mode, over length-sorted batches (little padding),
through the fused head. Output: one row per example with ``example_id``, ``ref_chosen_logps``,
``ref_rejected_logps`` and completion token counts; the cache key and fingerprints go into the
Parquet schema metadata and are checked on read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from dpo_engine.forward import collate, sequence_logps

ENGINE_VERSION = "0.1"
META_KEY = b"dpo_refcache"


class CacheError(RuntimeError):
    pass


@torch.inference_mode()
def compute_reference_logps(model: nn.Module, rows: pd.DataFrame, *, pad_id: int, batch_size: int,
                            chunk_size: int = 8192, device: torch.device | str = "cpu",
                            progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """Summed completion log-probs of every chosen and rejected sequence, in length-sorted batches."""
    model.eval()
    seqs = []  # (row position, side, prompt ids, completion ids)
    for i, r in enumerate(rows.itertuples(index=False)):
        seqs.append((i, 0, r.prompt_input_ids, r.chosen_input_ids))
        seqs.append((i, 1, r.prompt_input_ids, r.rejected_input_ids))
    seqs.sort(key=lambda s: len(s[2]) + len(s[3]))
    logps = torch.zeros(len(rows), 2, dtype=torch.float64)
    counts = torch.zeros(len(rows), 2, dtype=torch.long)
    for b0 in range(0, len(seqs), batch_size):
        chunk = seqs[b0:b0 + batch_size]
        batch = collate([s[2] for s in chunk], [s[3] for s in chunk], pad_id).to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                            enabled=torch.device(device).type == "cuda"):
            out = sequence_logps(model, batch, chunk_size=chunk_size)
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


def write_cache(df: pd.DataFrame, path: Path, meta: dict) -> None:
    """Atomic write (temporary file, then rename) with the metadata in the Parquet schema."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                           META_KEY: json.dumps(meta, sort_keys=True).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def read_cache(path: Path, expect_ids: list[str] | None = None, expect_key: str | None = None
               ) -> pd.DataFrame:
    """Read and verify: metadata key, row count, every expected example id present."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise CacheError(f"reference cache {path} is unreadable ({e}); delete it to rebuild") from None
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    if expect_key is not None and meta.get("key") != expect_key:
        raise CacheError(f"reference cache {path} has key {meta.get('key')}, expected {expect_key}")
    df = table.to_pandas()
    if expect_ids is not None:
        missing = set(expect_ids) - set(df["example_id"])
        if missing or len(df) != len(expect_ids):
            raise CacheError(f"reference cache {path}: {len(df)} rows for {len(expect_ids)} examples, "
                             f"{len(missing)} example ids missing")
    df.attrs["meta"] = meta
    return df
