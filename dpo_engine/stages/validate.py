"""Stage 1: validate/convert the train and eval data into tokenized, explicit ``valid.parquet``."""

from __future__ import annotations

from dataclasses import dataclass, field
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


def set_sources(cfg: RunConfig) -> dict[str, str]:
    """``{name: resolved source}`` of the named evaluation sets (``eval.sets``), in config order."""
    return {name: resolve_source(s.resolved_source()) for name, s in cfg.eval.sets.items()}


def set_dir(out: Path, name: str) -> Path:
    """Where named set ``name`` is validated, under the stage folder ``out``."""
    return Path(out) / "sets" / name


def data_fingerprint(cfg: RunConfig, sources: tuple[str, str | None] | None = None,
                     sets: dict[str, str] | None = None) -> str:
    """Content hash of the resolved train and eval sources, and of the named evaluation sets' when
    there are any (cheap: file hashes are cached)."""
    sets = set_sources(cfg) if sets is None else sets
    named = [f"{n}={source_fingerprint(s)}" for n, s in sets.items()]  # none: the hash as before sets
    return fingerprint(*(source_fingerprint(s) for s in (sources or _sources(cfg))), *named)


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
    set_sources: dict[str, str] = field(default_factory=dict)  # eval.sets: name -> resolved source


def resolve(cfg: RunConfig, tokenizer=None) -> Inputs:
    model_path = resolve_model_path(cfg.model.name_or_path)
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.model, model_path)
    proc = load_processor(cfg.model, model_path, tok)
    tok_fp = tokenizer_fingerprint(tok)  # a processor's image tokens are part of the tokenization
    tok_fp = fingerprint(tok_fp, processor_fingerprint(proc)) if proc is not None else tok_fp
    sources, sets = _sources(cfg), set_sources(cfg)
    return Inputs(model_path, tok, tok_fp, sources, data_fingerprint(cfg, sources, sets), proc, sets)


def key(cfg: RunConfig, tokenizer=None, inputs: Inputs | None = None) -> str:
    inputs = inputs or resolve(cfg, tokenizer)
    named = [(n, s.limit) for n, s in cfg.eval.sets.items()]  # content: in data_fingerprint
    return fingerprint(STAGE, inputs.data_fingerprint, inputs.tokenizer_fingerprint, cfg.section_hash("data"),
                       *([named] if named else []))  # without sets: the key as before


def _validate_sets(cfg: RunConfig, inputs: Inputs, out: Path) -> dict[str, dict]:
    """Each named evaluation set into ``validate/sets/<name>/``, like the eval split (its own
    report and rejects, row by row); a set with no valid pair stops the stage, naming it."""
    reports = {}
    data = cfg.data.model_copy(update={"eval_limit": None})  # a set's limit is its own (null: all)
    for name, src in inputs.set_sources.items():
        where = set_dir(out, name)
        reports[name] = validate_split(src, where, inputs.tokenizer, data, split=f"eval.sets.{name}",
                                       limit=cfg.eval.sets[name].limit, processor=inputs.processor)
        check_not_empty(reports[name], where)
    return reports


def _entry(where: Path, r: dict) -> dict:
    """What later stages read of a validated split in ``where``."""
    return {"valid": str(where / "valid.parquet"), "rejects": str(where / "rejects.parquet"),
            "report": str(where / "report.json"), "rows": r["valid"], "rows_in": r["rows_in"],
            "rejected": r["rejected"], "fingerprint": r["fingerprint"]}


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
        set_reports = _validate_sets(cfg, inputs, out)
    splits = {name: _entry(out / name, r) for name, r in reports.items()}
    sets = {name: _entry(set_dir(out, name), r) for name, r in set_reports.items()}
    tr, ev = reports["train"], reports["eval"]
    set_metrics = {f"data/{n}_{k}": r[v] for n, r in set_reports.items() for k, v in (("pairs", "valid"),
                                                                                      ("rejected", "rejected"))}
    set_line = "".join(f", set {n} {r['valid']}/{r['rows_in']} valid ({r['rejected']} rejected)"
                       for n, r in set_reports.items())
    result = {
        "stage": STAGE, "fingerprint": fp, "run_dir": str(run_dir), "reused": False,
        "seconds": t.seconds, **splits, **({"sets": sets} if sets else {}),
        "model_path": model_path, "model_fingerprint": model_fingerprint(model_path, cfg.model.revision),
        "tokenizer_fingerprint": inputs.tokenizer_fingerprint, "vision": inputs.processor is not None,
        "sources": {"train": train_src, "eval": eval_src, **({"sets": inputs.set_sources} if sets else {})},
        "data_fingerprint": inputs.data_fingerprint,
        "outputs": [s[k] for s in [*splits.values(), *sets.values()] for k in ("valid", "rejects", "report")],
        "metrics": {"data/train_pairs": tr["valid"], "data/eval_pairs": ev["valid"],
                    "data/train_rejected": tr["rejected"], "data/eval_rejected": ev["rejected"], **set_metrics},
        "summary": (f"validate: train {tr['valid']}/{tr['rows_in']} valid ({tr['rejected']} rejected), "
                    f"eval {ev['valid']}/{ev['rows_in']} valid ({ev['rejected']} rejected){set_line} "
                    f"in {t.seconds:.1f}s"),
    }
    crash_point(STAGE, "before-record")
    return record(STAGE, fp, result)
