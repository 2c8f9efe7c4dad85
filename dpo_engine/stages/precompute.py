"""Stage 2: reference log-probs of the train and eval pairs, computed once, cached to Parquet.

The cache lives in the shared folder ``<state home>/cache/reference/<key>/`` (key: reference model,
tokenizer, data and length fingerprints, weights dtype, the autocast dtype ``train.precision``
resolves to on this machine's device, engine version), so runs and experiments with the same key
share it: a hit does zero forward passes and does not even load the model. Before the first forward
pass every input id of the train and eval rows is checked against the model's vocabulary.
The reference model is ``reference.model_path`` when set (a different model than the policy's base),
else the policy's base. With ``reference.source: adapter_disabled`` or ``model`` only the eval split is
precomputed: training gets its reference online. Each named evaluation set (``eval.sets``) is
precomputed like the eval split, under its own cache key (split ``sets/<name>``).

With ``train.num_processes > 1`` (or ``train.accelerate_config``) the stage runs under ``accelerate
launch`` like training: every rank computes its share of each missing cache shard and rank 0 writes
the shards (``dpo_engine.reference.shard_across_ranks``); a cache that is already complete is read
in this process, without launching.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from data_contracts.config import RunConfig
from data_contracts.errors import DataError
from data_contracts.helpers import fingerprint, write_json
from data_contracts.state import state_home
from data_contracts.validation import read_valid
from dpo_engine import progress
from dpo_engine.modeling import (
    ModelError,
    VisionInputs,
    autocast_dtype,
    check_config,
    load_processor,
    load_reference_model,
    load_tokenizer,
    model_fingerprint,
    pick_device,
    reference_model_path,
)
from dpo_engine.reference import (
    COMPLETE,
    ENGINE_VERSION,
    cached_reference_logps,
    compute_reference_logps,
    follow_shards,
    release_followers,
    shard_across_ranks,
)
from dpo_engine.stages import launch
from dpo_engine.stages.index import record, reused
from dpo_engine.stages.runtime import Timer, crash_point
from dpo_engine.training import world

STAGE = "precompute"


def _computed(logps, split: str):
    crash_point(STAGE, f"{split}-computed")  # crash drill: computed, its cache shard not yet written
    return logps


def reference_fingerprint(cfg: RunConfig, validated: dict) -> str:
    """The reference model's fingerprint: the policy base's unless ``reference.model_path`` is set."""
    if cfg.reference.model_path is None:
        return validated["model_fingerprint"]
    return model_fingerprint(reference_model_path(cfg.reference.model_path, validated["model_path"]))


def compute_dtype(cfg: RunConfig, device: torch.device | str | None = None) -> str:
    """The autocast the reference computes under on ``device`` (default: the one the precompute
    picks): ``train.precision`` resolved as training resolves it ("auto" is bf16 on CUDA and no
    autocast, i.e. the weights' dtype, on the CPU). "bfloat16", "float16" or "off"."""
    amp = autocast_dtype(cfg.train.precision, pick_device() if device is None else device)
    return "off" if amp is None else str(amp).removeprefix("torch.")


def cache_key(cfg: RunConfig, validated: dict, split: str, device: torch.device | str | None = None) -> str:
    """The shared cache entry of ``split``: the same config computed on a CUDA device (bf16 autocast
    under precision "auto") and on the CPU (fp32) are different entries."""
    extra = [cfg.model.init_kwargs] if cfg.model.init_kwargs else []  # keeps older keys unchanged
    # the reference computes under the training's autocast, as resolved on this device
    extra.append(f"autocast={compute_dtype(cfg, device)}")
    return fingerprint("reference", reference_fingerprint(cfg, validated), validated["tokenizer_fingerprint"],
                       split_entry(validated, split)["fingerprint"], cfg.data.max_length, cfg.data.truncation_mode,
                       cfg.model.dtype, cfg.loss.ld_alpha, ENGINE_VERSION, *extra)


SET_SPLIT = "sets/"  # the split name of named evaluation set <name>: "sets/<name>"


def split_entry(validated: dict, split: str) -> dict:
    """The validate stage's record of ``split``: "train", "eval" or a named set's "sets/<name>"."""
    if split.startswith(SET_SPLIT):
        return validated["sets"][split[len(SET_SPLIT):]]
    return validated[split]


def splits(cfg: RunConfig, validated: dict | None = None) -> tuple[str, ...]:
    """The splits this run precomputes: train (when the reference is precomputed), eval, and each
    named evaluation set that ``validated`` holds."""
    base = ("train", "eval") if cfg.reference.source == "precomputed" else ("eval",)
    return base + tuple(SET_SPLIT + n for n in (validated or {}).get("sets") or {})


def cache_keys(cfg: RunConfig, validated: dict) -> dict[str, str]:
    """``{split: cache key}`` of the splits this run precomputes (resolved once per stage run)."""
    return {s: cache_key(cfg, validated, s) for s in splits(cfg, validated)}


def key(cfg: RunConfig, validated: dict, keys: dict[str, str] | None = None) -> str:
    return fingerprint(STAGE, *(keys or cache_keys(cfg, validated)).values())


def training_key(keys: dict[str, str]) -> str:
    """The part of the stage's fingerprint that training depends on: the train and eval splits' keys
    (the named evaluation sets' left out, so adding one does not train again). Without sets: the
    stage's fingerprint itself."""
    return fingerprint(STAGE, *(k for s, k in keys.items() if not s.startswith(SET_SPLIT)))


def _cache_dir() -> Path:
    return state_home() / "cache" / "reference"


def _all_cached(keys: dict[str, str]) -> bool:
    return all((_cache_dir() / k / COMPLETE).is_file() for k in keys.values())


def run(cfg: RunConfig, run_dir: Path, validated: dict) -> dict:
    check_config(cfg)
    keys = cache_keys(cfg, validated)  # the stage's inputs, resolved once
    fp = key(cfg, validated, keys)
    rank, n_ranks = world()
    if rank > 0:  # a launched worker: computes the shares of the shards that rank 0 hands out
        _computer(cfg, validated, follower=True)
        return {}
    hit = reused(STAGE, fp, run_dir)
    if hit is None and launch.wants_launch(cfg) and not _all_cached(keys):
        return launch.launch_stage(STAGE, cfg, run_dir, validated)
    if n_ranks == 1:
        return hit or _run(cfg, run_dir, validated, fp, keys, _computer(cfg, validated))
    try:
        return hit or _run(cfg, run_dir, validated, fp, keys, shard_across_ranks(_computer(cfg, validated)))
    finally:
        release_followers()


def _computer(cfg: RunConfig, validated: dict, follower: bool = False):
    """``compute(rows, split)``: the reference log-probs of ``rows``, loading the reference model on
    first use. ``follower``: serve rank 0's shards instead (a rank > 0), then free the model."""
    device = pick_device()
    tok = load_tokenizer(cfg.model, validated["model_path"])
    proc = load_processor(cfg.model, validated["model_path"], tok)  # a vision-language model's
    model = vision = None

    def compute(rows: pd.DataFrame, split: str) -> pd.DataFrame:
        nonlocal model, vision
        if model is None:
            model = load_reference_model(cfg.model, cfg.reference.model_path, validated["model_path"], device)
            vision = VisionInputs(proc, model) if proc is not None else None
            _check_vocab(model, tok, cfg.reference.model_path)
            vocab = vocab_size(model)
            named = [SET_SPLIT + n for n in validated.get("sets") or {}]
            for s in [s for s in ("train", "eval") if validated.get(s)] + named:  # before any forward
                entry = split_entry(validated, s)                                 # pass, on every rank
                check_token_ids(read_valid(entry["valid"], ["example_id", *ID_COLUMNS]), vocab,
                                f"{s} split {entry['valid']}")
        with tqdm(total=2 * len(rows), desc=f"precompute {split}", unit="seq", disable=follower) as bar:
            return compute_reference_logps(model, rows, pad_id=tok.pad_token_id,
                                           batch_size=cfg.reference.batch_size,
                                           chunk_size=cfg.train.logit_chunk_size, device=device,
                                           ld_alpha=cfg.loss.ld_alpha, precision=cfg.train.precision,
                                           progress=lambda n: (bar.update(n), progress.advance(n)),
                                           vision=vision)

    if follower:
        follow_shards(lambda split: read_valid(split_entry(validated, split)["valid"], REFERENCE_COLUMNS), compute)
        del model
        gc.collect()
    return compute


def shard_rows(n: int) -> int:
    """Rows per cache shard: 1,024, more for a big split (at most about 200 shards, at most 65,536 rows
    each), so a million rows are 200 files, not a thousand."""
    return min(max(1024, -(-n // 200)), 65536)


def _check_vocab(model, tok, model_path: str | None) -> None:
    rows = model.get_output_embeddings().weight.shape[0]
    if model_path is not None and rows < len(tok):
        raise ModelError(f"reference.model_path {model_path}: its vocabulary has {rows} tokens, the "
                         f"policy's tokenizer {len(tok)}; the reference must share the policy's tokenizer")


ID_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
# what the reference pass reads of valid.parquet (not the texts: a split is held once, as token ids)
REFERENCE_COLUMNS = ["example_id", *ID_COLUMNS, "prompt_len", "chosen_len", "rejected_len", "images"]


def vocab_size(model) -> int:
    """Rows of the model's output embedding (and of its input embedding, when smaller): the token ids
    the model can take and score."""
    sizes = [m.weight.shape[0] for m in (model.get_output_embeddings(), model.get_input_embeddings())
             if m is not None and getattr(m, "weight", None) is not None]
    return min(sizes)


def check_token_ids(pairs: pd.DataFrame, vocab: int, where: str) -> None:
    """Raise one ModelError (a user error: one line from the CLI, no retry) when any prompt, chosen or
    rejected input id of the tokenized ``pairs`` (valid.parquet rows) is < 0 or >= ``vocab``, naming
    the first such example id, column and id: the data was tokenized with a tokenizer that does not
    match the model, and a forward pass would fail with an index error (or a CUDA assert)."""
    bad_total, first = 0, None
    for col in ID_COLUMNS:
        if col not in pairs.columns or len(pairs) == 0:
            continue
        lists = pairs[col].to_numpy()
        lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        if lengths.sum() == 0:
            continue
        flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists])
        bad = np.flatnonzero((flat < 0) | (flat >= vocab))
        if bad.size == 0:
            continue
        bad_total += bad.size
        row = int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
        if first is None:
            first = (pairs["example_id"].iloc[row], col, int(flat[bad[0]]))
    if first is not None:
        eid, col, tid = first
        raise ModelError(f"{where}: example_id {eid}: {col} holds token id {tid}, outside the model's "
                         f"vocabulary of {vocab} tokens (ids 0..{vocab - 1}; {bad_total} out-of-range id(s) in all): "
                         f"the tokenizer and the model do not match; set model.tokenizer to the model's own "
                         f"tokenizer (or use the model the data was tokenized for) and re-run validate")


def _run(cfg: RunConfig, run_dir: Path, validated: dict, fp: str, keys: dict[str, str], compute) -> dict:
    out = Path(run_dir) / STAGE
    result = {"stage": STAGE, "fingerprint": fp, "training_fingerprint": training_key(keys), "run_dir": str(run_dir),
              "reused": False, "train_ref": None, "train_ref_key": None}
    computed, tokens, paths = 0, 0, {}
    ref_fp = reference_fingerprint(cfg, validated)
    with Timer() as t:
        for split, ck in keys.items():
            entry = split_entry(validated, split)
            rows = read_valid(entry["valid"], REFERENCE_COLUMNS)  # token ids, not the texts
            if rows.empty:  # the cache cannot hold zero shards; validate stops such a split first
                raise DataError(f"data error: {split} split {entry['valid']} has no valid "
                                f"rows; fix the data (see its report.json) and re-run validate")
            meta = {"split": split, "data": entry["fingerprint"], "model": ref_fp,
                    "tokenizer": validated["tokenizer_fingerprint"],
                    "max_length": cfg.data.max_length, "truncation_mode": cfg.data.truncation_mode,
                    "dtype": f"weights={cfg.model.dtype},autocast={compute_dtype(cfg)}",
                    "precision": cfg.train.precision, "ld_alpha": cfg.loss.ld_alpha, "engine": ENGINE_VERSION}
            with progress.Meter(f"{STAGE} {split}", 2 * len(rows), updates=10):  # sequences, for the UI
                _, stats = cached_reference_logps(_cache_dir(), ck, rows, meta,
                                                  lambda part, s=split: _computed(compute(part, s), s),
                                                  shard_size=shard_rows(len(rows)))
            paths[split] = stats["path"]
            if split.startswith(SET_SPLIT):  # a named set's: under "sets"
                result.setdefault("sets", {})[split[len(SET_SPLIT):]] = {"ref": stats["path"], "ref_key": ck}
            else:
                result[f"{split}_ref"], result[f"{split}_ref_key"] = stats["path"], ck
            crash_point(STAGE, f"{split}-cached")
            computed += stats["computed_examples"]
            tokens += int(2 * rows["prompt_len"].sum() + rows["chosen_len"].sum() + rows["rejected_len"].sum())
        gc.collect()
    n_train, n_eval = validated["train"]["rows"], validated["eval"]["rows"]
    n_sets = {n: s["rows"] for n, s in (validated.get("sets") or {}).items()}
    how = ("all from the shared cache, 0 forward passes" if computed == 0
           else f"{computed} of {n_train + n_eval + sum(n_sets.values())} pairs computed")
    ranks = world()[1]
    result.update({
        "seconds": t.seconds, "computed_examples": computed, "processes": ranks,
        "reference_model": reference_model_path(cfg.reference.model_path, validated["model_path"]),
        "outputs": [str(Path(p) / "_COMPLETE.json") for p in paths.values()],
        "metrics": {"precompute/computed_pairs": computed,
                    **({"precompute/tokens_per_second": tokens / max(t.seconds, 1e-9)} if computed else {})},
        "summary": (f"precompute: reference log-probs of {n_train} train + {n_eval} eval pairs"
                    f"{''.join(f' + {k} {n}' for n, k in n_sets.items())} "
                    f"({how}{f', {ranks} processes' if ranks > 1 and computed else ''}) in {t.seconds:.1f}s"),
    })
    write_json(out / "reference_cache.json", paths)
    crash_point(STAGE, "before-record")
    return record(STAGE, fp, result)
