"""Stage 2: reference log-probs of the train and eval pairs, computed once, cached to Parquet."""

from __future__ import annotations

import gc
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from data_contracts.config import RunConfig
from dpo_engine.models import load_model, load_tokenizer, pick_device
from dpo_engine.refcache import ENGINE_VERSION, compute_reference_logps, write_cache
from dpo_engine.stages.common import Timer, fingerprint, record, reused

STAGE = "precompute"


def key(cfg: RunConfig, validated: dict) -> str:
    return fingerprint(STAGE, validated["fingerprint"], validated["model_fingerprint"],
                       cfg.model.dtype, ENGINE_VERSION)


def run(cfg: RunConfig, run_dir: Path, validated: dict) -> dict:
    fp = key(cfg, validated)
    hit = reused(STAGE, fp, run_dir)
    if hit:
        return hit
    out = Path(run_dir) / STAGE
    device = pick_device()
    tok = load_tokenizer(cfg.model, validated["model_path"])
    with Timer() as t:
        model = load_model(cfg.model, validated["model_path"], device)
        paths, tokens = {}, 0
        for split in ("train", "eval"):
            rows = pd.read_parquet(validated[split]["valid"])
            with tqdm(total=2 * len(rows), desc=f"precompute {split}", unit="seq") as bar:
                df = compute_reference_logps(model, rows, pad_id=tok.pad_token_id,
                                             batch_size=cfg.reference.batch_size,
                                             chunk_size=cfg.train.logit_chunk_size, device=device,
                                             progress=bar.update)
            tokens += int(rows["prompt_len"].sum() * 2 + rows["chosen_len"].sum() + rows["rejected_len"].sum())
            paths[split] = out / f"{split}_ref_logps.parquet"
            write_cache(df, paths[split], {"key": fp, "split": split, "data": validated[split]["fingerprint"],
                                           "model": validated["model_fingerprint"],
                                           "tokenizer": validated["tokenizer_fingerprint"],
                                           "engine": ENGINE_VERSION})
        del model
        gc.collect()
    result = {
        "stage": STAGE, "fingerprint": fp, "run_dir": str(run_dir), "reused": False, "seconds": t.seconds,
        "train_ref": str(paths["train"]), "eval_ref": str(paths["eval"]),
        "outputs": [str(p) for p in paths.values()],
        "metrics": {"precompute/tokens_per_second": tokens / max(t.seconds, 1e-9)},
        "summary": (f"precompute: reference log-probs of {validated['train']['rows']} train + "
                    f"{validated['eval']['rows']} eval pairs ({tokens} tokens) in {t.seconds:.1f}s"),
    }
    return record(STAGE, fp, result)
