"""Stage 1: validate/convert the train and eval data into tokenized, explicit ``valid.parquet``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_contracts.config import BUILTIN_DATASET, RunConfig
from data_contracts.helpers import fingerprint
from data_contracts.sources import resolve_source, source_fingerprint
from data_contracts.validation import check_not_empty, validate_split
from dpo_engine.modeling import (load_processor, load_tokenizer, model_fingerprint, processor_fingerprint,
                                 resolve_model_path, tokenizer_fingerprint)
from dpo_engine.stages.index import record, reused
from dpo_engine.stages.runtime import Timer, crash_point

STAGE = "validate"


def _sources(cfg: RunConfig):
    """(train, eval) sources of this run: ``{date}`` and ``source_partition`` resolved now."""
    d = cfg.data
    source = resolve_source(d.source, d.source_partition)
    if d.eval_source:
        return source, resolve_source(d.eval_source)
    if source.startswith(BUILTIN_DATASET):
        return source, f"{BUILTIN_DATASET}@eval"
    return source, None  # eval carved out of source by eval_fraction


def data_fingerprint(cfg: RunConfig, sources: tuple[str, str | None] | None = None) -> str:
    """Content hash of the resolved train and eval sources (cheap: file hashes are cached)."""
    return fingerprint(*(source_fingerprint(s) for s in (sources or _sources(cfg))))


@dataclass(frozen=True)
class Inputs:
    """What the stage reads, resolved once: a ``{date}`` or newest partition is looked up one time,
    so the fingerprint and the data validated can never disagree."""
    model_path: str
    tokenizer: Any
    tokenizer_fingerprint: str
    sources: tuple[str, str | None]  # (train, eval); eval None: carved out of train
    data_fingerprint: str
    processor: Any = None  # a vision-language model's processor (images are validated with it)


def resolve(cfg: RunConfig, tokenizer=None) -> Inputs:
    model_path = resolve_model_path(cfg.model.name_or_path)
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.model, model_path)
    proc = load_processor(cfg.model, model_path, tok)
    tok_fp = tokenizer_fingerprint(tok)  # a processor's image tokens are part of the tokenization
    tok_fp = fingerprint(tok_fp, processor_fingerprint(proc)) if proc is not None else tok_fp
    sources = _sources(cfg)
    return Inputs(model_path, tok, tok_fp, sources, data_fingerprint(cfg, sources), proc)


def key(cfg: RunConfig, tokenizer=None, inputs: Inputs | None = None) -> str:
    inputs = inputs or resolve(cfg, tokenizer)
    return fingerprint(STAGE, inputs.data_fingerprint, inputs.tokenizer_fingerprint, cfg.section_hash("data"))


def run(cfg: RunConfig, run_dir: Path) -> dict:
    inputs = resolve(cfg)
    model_path, tok = inputs.model_path, inputs.tokenizer
    fp = key(cfg, inputs=inputs)
    hit = reused(STAGE, fp, run_dir)
    if hit:
        return hit
    out = Path(run_dir) / STAGE
    train_src, eval_src = inputs.sources
    with Timer() as t:
        # without an eval source, both splits stream from the one source by a seeded hash split
        split = (lambda side: (cfg.data.eval_fraction, cfg.data.shuffle_seed, side)) \
            if eval_src is None else (lambda side: None)
        reports = {
            "train": validate_split(train_src, out / "train", tok, cfg.data, split="train",
                                    limit=cfg.data.train_limit, holdout=split("train"), processor=inputs.processor),
        }
        # a split with no valid pair stops here, whatever the policy allows: precompute cannot
        # concatenate nothing and the trainer cannot order zero pairs (its files stay to inspect)
        check_not_empty(reports["train"], out / "train")
        crash_point(STAGE, "train-written")  # crash drill: train split written, eval not yet
        reports |= {
            "eval": validate_split(eval_src or train_src, out / "eval", tok, cfg.data, split="eval",
                                   limit=cfg.data.eval_limit, holdout=split("eval"), processor=inputs.processor),
        }
        check_not_empty(reports["eval"], out / "eval")  # evaluate needs held-out pairs
    splits = {name: {"valid": str(out / name / "valid.parquet"),
                     "rejects": str(out / name / "rejects.parquet"),
                     "report": str(out / name / "report.json"),
                     "rows": r["valid"], "rows_in": r["rows_in"], "rejected": r["rejected"],
                     "fingerprint": r["fingerprint"]} for name, r in reports.items()}
    tr, ev = reports["train"], reports["eval"]
    result = {
        "stage": STAGE, "fingerprint": fp, "run_dir": str(run_dir), "reused": False,
        "seconds": t.seconds, **splits,
        "model_path": model_path, "model_fingerprint": model_fingerprint(model_path, cfg.model.revision),
        "tokenizer_fingerprint": inputs.tokenizer_fingerprint, "vision": inputs.processor is not None,
        "sources": {"train": train_src, "eval": eval_src}, "data_fingerprint": inputs.data_fingerprint,
        "outputs": [s[k] for s in splits.values() for k in ("valid", "rejects", "report")],
        "metrics": {"data/train_pairs": tr["valid"], "data/eval_pairs": ev["valid"],
                    "data/train_rejected": tr["rejected"], "data/eval_rejected": ev["rejected"]},
        "summary": (f"validate: train {tr['valid']}/{tr['rows_in']} valid ({tr['rejected']} rejected), "
                    f"eval {ev['valid']}/{ev['rows_in']} valid ({ev['rejected']} rejected) "
                    f"in {t.seconds:.1f}s"),
    }
    crash_point(STAGE, "before-record")
    return record(STAGE, fp, result)
