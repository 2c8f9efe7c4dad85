"""Stage 1: validate/convert the train and eval data into tokenized, explicit ``valid.parquet``."""

from __future__ import annotations

from pathlib import Path

from data_contracts.config import BUILTIN_DATASET, RunConfig
from data_contracts.helpers import fingerprint
from data_contracts.sources import resolve_source, source_fingerprint
from data_contracts.validation import validate_split
from dpo_engine.modeling import load_tokenizer, model_fingerprint, resolve_model_path, tokenizer_fingerprint
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


def data_fingerprint(cfg: RunConfig) -> str:
    """Content hash of the resolved train and eval sources (cheap: file hashes are cached)."""
    return fingerprint(*(source_fingerprint(s) for s in _sources(cfg)))


def key(cfg: RunConfig, tokenizer=None) -> str:
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model, resolve_model_path(cfg.model.name_or_path))
    return fingerprint(STAGE, data_fingerprint(cfg), tokenizer_fingerprint(tokenizer),
                       cfg.section_hash("data"))


def run(cfg: RunConfig, run_dir: Path) -> dict:
    model_path = resolve_model_path(cfg.model.name_or_path)
    tok = load_tokenizer(cfg.model, model_path)
    fp = key(cfg, tok)
    hit = reused(STAGE, fp, run_dir)
    if hit:
        return hit
    out = Path(run_dir) / STAGE
    train_src, eval_src = _sources(cfg)
    with Timer() as t:
        # without an eval source, both splits stream from the one source by a seeded hash split
        split = (lambda side: (cfg.data.eval_fraction, cfg.data.shuffle_seed, side)) \
            if eval_src is None else (lambda side: None)
        reports = {
            "train": validate_split(train_src, out / "train", tok, cfg.data, split="train",
                                    limit=cfg.data.train_limit, holdout=split("train")),
        }
        crash_point(STAGE, "train-written")  # crash drill: train split written, eval not yet
        reports |= {
            "eval": validate_split(eval_src or train_src, out / "eval", tok, cfg.data, split="eval",
                                   limit=cfg.data.eval_limit, holdout=split("eval")),
        }
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
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "sources": {"train": train_src, "eval": eval_src}, "data_fingerprint": data_fingerprint(cfg),
        "outputs": [s[k] for s in splits.values() for k in ("valid", "rejects", "report")],
        "metrics": {"data/train_pairs": tr["valid"], "data/eval_pairs": ev["valid"],
                    "data/train_rejected": tr["rejected"], "data/eval_rejected": ev["rejected"]},
        "summary": (f"validate: train {tr['valid']}/{tr['rows_in']} valid ({tr['rejected']} rejected), "
                    f"eval {ev['valid']}/{ev['rows_in']} valid ({ev['rejected']} rejected) "
                    f"in {t.seconds:.1f}s"),
    }
    crash_point(STAGE, "before-record")
    return record(STAGE, fp, result)
