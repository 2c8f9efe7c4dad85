"""Stage 2: reference log-probs of the train and eval pairs, computed once, cached to Parquet.

The cache lives in the shared folder ``<state home>/cache/reference/<key>/`` (key: model, tokenizer,
data and length fingerprints, dtype, engine version), so runs and experiments with the same key
share it: a hit does zero forward passes and does not even load the model.
With ``reference.source: adapter_disabled`` only the eval split is precomputed: training gets its
reference from the adapter-disabled policy.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from data_contracts.config import RunConfig, state_home
from dpo_engine.models import load_model, load_tokenizer, pick_device
from dpo_engine.refcache import ENGINE_VERSION, cached_reference_logps, compute_reference_logps
from dpo_engine.stages.common import Timer, crash_point, fingerprint, read_valid, record, reused, write_json

STAGE = "precompute"


def _computed(logps, split: str):
    crash_point(STAGE, f"{split}-computed")  # crash drill: computed, its cache shard not yet written
    return logps


def cache_key(cfg: RunConfig, validated: dict, split: str) -> str:
    extra = [cfg.model.init_kwargs] if cfg.model.init_kwargs else []  # keeps older keys unchanged
    return fingerprint("reference", validated["model_fingerprint"], validated["tokenizer_fingerprint"],
                       validated[split]["fingerprint"], cfg.data.max_length, cfg.data.truncation_mode,
                       cfg.model.dtype, cfg.loss.ld_alpha, ENGINE_VERSION, *extra)


def splits(cfg: RunConfig) -> tuple[str, ...]:
    return ("eval",) if cfg.reference.source == "adapter_disabled" else ("train", "eval")


def key(cfg: RunConfig, validated: dict) -> str:
    return fingerprint(STAGE, *(cache_key(cfg, validated, s) for s in splits(cfg)))


def run(cfg: RunConfig, run_dir: Path, validated: dict) -> dict:
    from dpo_engine.adapters import check_config

    check_config(cfg)
    fp = key(cfg, validated)
    hit = reused(STAGE, fp, run_dir)
    if hit:
        return hit
    out = Path(run_dir) / STAGE
    device = pick_device()
    tok = load_tokenizer(cfg.model, validated["model_path"])
    model = None

    def compute(rows: pd.DataFrame, split: str) -> pd.DataFrame:
        nonlocal model
        if model is None:
            model = load_model(cfg.model, validated["model_path"], device)
        with tqdm(total=2 * len(rows), desc=f"precompute {split}", unit="seq") as bar:
            return compute_reference_logps(model, rows, pad_id=tok.pad_token_id,
                                           batch_size=cfg.reference.batch_size,
                                           chunk_size=cfg.train.logit_chunk_size, device=device,
                                           ld_alpha=cfg.loss.ld_alpha, progress=bar.update)

    result = {"stage": STAGE, "fingerprint": fp, "run_dir": str(run_dir), "reused": False,
              "train_ref": None, "train_ref_key": None}
    computed, tokens = 0, 0
    with Timer() as t:
        for split in splits(cfg):
            rows = read_valid(validated[split]["valid"])
            ck = cache_key(cfg, validated, split)
            meta = {"split": split, "data": validated[split]["fingerprint"],
                    "model": validated["model_fingerprint"], "tokenizer": validated["tokenizer_fingerprint"],
                    "max_length": cfg.data.max_length, "truncation_mode": cfg.data.truncation_mode,
                    "dtype": cfg.model.dtype, "ld_alpha": cfg.loss.ld_alpha, "engine": ENGINE_VERSION}
            _, stats = cached_reference_logps(state_home() / "cache" / "reference", ck, rows, meta,
                                              lambda part, s=split: _computed(compute(part, s), s))
            result[f"{split}_ref"], result[f"{split}_ref_key"] = stats["path"], ck
            crash_point(STAGE, f"{split}-cached")
            computed += stats["computed_examples"]
            tokens += int(2 * rows["prompt_len"].sum() + rows["chosen_len"].sum() + rows["rejected_len"].sum())
        del model
        gc.collect()
    n_train, n_eval = validated["train"]["rows"], validated["eval"]["rows"]
    how = ("all from the shared cache, 0 forward passes" if computed == 0
           else f"{computed} of {n_train + n_eval} pairs computed")
    result.update({
        "seconds": t.seconds, "computed_examples": computed,
        "outputs": [str(Path(result[f"{s}_ref"]) / "_COMPLETE.json") for s in splits(cfg)],
        "metrics": {"precompute/computed_pairs": computed,
                    **({"precompute/tokens_per_second": tokens / max(t.seconds, 1e-9)} if computed else {})},
        "summary": (f"precompute: reference log-probs of {n_train} train + {n_eval} eval pairs "
                    f"({how}) in {t.seconds:.1f}s"),
    })
    write_json(out / "reference_cache.json", {s: result[f"{s}_ref"] for s in splits(cfg)})
    crash_point(STAGE, "before-record")
    return record(STAGE, fp, result)
