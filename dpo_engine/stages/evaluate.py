"""Stage 4: the trained policy against its reference, on held-out pairs and held-out prompts: the
default held-out split (metrics ``eval/...``) and each named evaluation set (``eval.sets``, metrics
under its prefix), all with the policy and the reference loaded once."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pandas as pd

from data_contracts.config import RunConfig
from data_contracts.errors import DataError
from data_contracts.helpers import atomic_write, fingerprint, write_json
from data_contracts.sources import source_fingerprint
from data_contracts.state import mlflow_uri
from data_contracts.validation import read_valid
from dpo_engine import tracking
from dpo_engine.evaluation.benchmarks import local_tasks_fingerprint, run_benchmarks
from dpo_engine.evaluation import load_judge, plots, win_rate_summary
from dpo_engine.evaluation.one_set import DEFAULT_PREFIX, EvalSet, Models, evaluate_set, prefixed
from dpo_engine.modeling import VisionInputs, load_model, load_processor, load_reference_model, load_tokenizer, pick_device
from dpo_engine.reference import read_cache
from dpo_engine.stages.index import record, reused
from dpo_engine.stages.runtime import Timer, crash_point
from dpo_engine.stages.validate import set_sources

STAGE = "evaluate"


def key(cfg: RunConfig, trained: dict) -> str:
    # the named sets' content: training (whose fingerprint this takes) does not depend on them
    named = [fingerprint(*(source_fingerprint(s) for s in set_sources(cfg).values()))] if cfg.eval.sets else []
    return fingerprint(STAGE, trained["fingerprint"], cfg.section_hash("eval"), cfg.reference.model_path or "",
                       local_tasks_fingerprint(cfg.eval.benchmarks), *named)  # the local benchmark files' content


def _curves(out: Path, trained: dict) -> list[Path]:
    """The training curves (from the train stage's history.json) as a PNG."""
    history_file = Path(trained.get("history") or Path(trained["run_dir"]) / "train" / "history.json")
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    return [out / "training_curves.png"] if atomic_write(out / "training_curves.png",
                                                          lambda p: plots.training_curves(history, p)) else []


def _write_set(where: Path, table: pd.DataFrame, metrics: dict) -> list[Path]:
    """One set's samples.jsonl and judged scores PNG (``metrics`` named eval/...) in ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    atomic_write(where / "samples.jsonl", lambda tmp: table.to_json(tmp, orient="records", lines=True,
                                                                     force_ascii=False))
    made = [where / "samples.jsonl"]
    if atomic_write(where / "eval_scores.png", lambda p: plots.eval_scores(table, metrics, p)) is not None:
        made.append(where / "eval_scores.png")  # written whole, then renamed
    return made


def _sets(cfg: RunConfig, validated: dict, precomputed: dict) -> list[EvalSet]:
    """The default held-out split, then each named set, with its pairs, reference log-probs and judge
    (a judge named by several sets is loaded once)."""
    judges: dict[str, object] = {}

    def judge(spec: str | None):
        if spec and spec not in judges:
            judges[spec] = load_judge(spec)
        return judges.get(spec) if spec else None

    def pairs_and_ref(valid: str, ref: str, ref_key: str):
        pairs = read_valid(valid)
        return pairs, read_cache(Path(ref), expect_ids=pairs["example_id"].tolist(), expect_key=ref_key)

    out = [EvalSet("eval", DEFAULT_PREFIX, *pairs_and_ref(validated["eval"]["valid"], precomputed["eval_ref"],
                                                          precomputed["eval_ref_key"]),
                   judge(cfg.eval.judge), cfg.eval.num_prompts, cfg.eval)]
    for name, s in cfg.eval.sets.items():
        v, p = (validated.get("sets") or {}).get(name), (precomputed.get("sets") or {}).get(name)
        if v is None or p is None:
            raise DataError(f"data error: eval.sets.{name}: not in the validate/precompute results this "
                            f"evaluation was given; re-run validate and precompute with this config")
        gen = cfg.eval.model_copy(update={"max_new_tokens": s.max_new_tokens}) if s.max_new_tokens else cfg.eval
        out.append(EvalSet(name, s.metric_prefix(name), *pairs_and_ref(v["valid"], p["ref"], p["ref_key"]),
                           judge(cfg.eval.set_judge(name)),
                           cfg.eval.num_prompts if s.num_prompts is None else s.num_prompts, gen))
    return out


def _set_line(s: EvalSet, m: dict) -> str:
    """The summary words of one set (``m``: its metrics named eval/...)."""
    line = f"accuracy {m['eval/rewards/accuracies']:.2f}, margin {m['eval/rewards/margins']:.3f}"
    if "eval/win_rate" in m:
        return line + ", " + win_rate_summary(m)
    return line + (", no judge" if s.num_prompts else ", no generations")


def run(cfg: RunConfig, run_dir: Path, validated: dict, precomputed: dict, trained: dict) -> dict:
    fp = key(cfg, trained)
    hit = reused(STAGE, fp, run_dir)
    if hit:
        return hit
    out = Path(run_dir) / STAGE
    device = pick_device()
    sets = _sets(cfg, validated, precomputed)
    tok = load_tokenizer(cfg.model, validated["model_path"])
    proc = load_processor(cfg.model, validated["model_path"], tok)  # a vision-language model's
    with Timer() as t:
        policy = load_model(cfg.model, trained["model_dir"], device)
        models = Models(cfg, policy, tok, device, VisionInputs(proc, policy) if proc is not None else None,
                        lambda: load_reference_model(cfg.model, cfg.reference.model_path, validated["model_path"],
                                                     device))
        results = [(s, *evaluate_set(s, models)) for s in sets]  # (set, metrics named eval/..., table)
        metrics = {k: v for s, m, _ in results for k, v in prefixed(m, s.prefix).items()}
        # lm-evaluation-harness tasks (eval.benchmarks) on both models: bench/, bench_ref/, bench_delta/
        metrics.update(run_benchmarks(cfg.eval.benchmarks, policy, models.reference, tok))
        del policy
        models.release()
        gc.collect()
    crash_point(STAGE, "computed")
    out.mkdir(parents=True, exist_ok=True)
    written = {s.name: _write_set(out if s.name == "eval" else out / "sets" / s.name, table, m)
               for s, m, table in results}
    pngs = _curves(out, trained) + written["eval"][1:]
    write_json(out / "metrics.json", metrics)
    crash_point(STAGE, "written")

    # through the run's outbox: an unreachable MLflow does not stop evaluation; what it could not
    # take is sent by the register stage, which waits for the server
    run_id = trained["mlflow_run_id"]
    tracking.connect(mlflow_uri(cfg), retry=tracking.RetryPolicy.from_config(cfg.registry), check=False)
    outbox = tracking.Outbox(run_id)
    # at the training's last step, where the periodic evaluation's curves end (not at step 0 below them)
    outbox.log_metrics(metrics, step=trained.get("steps") or 0)
    for s, _, table in results:
        folder = "evaluation" if s.name == "eval" else f"evaluation/sets/{s.name}"
        files = [out / "samples.jsonl", out / "metrics.json", *pngs] if s.name == "eval" else written[s.name]
        for f in files:
            outbox.log_artifact(f, folder)
        if not table.empty:
            outbox.log_table(written[s.name][0], f"{folder}/samples_table.json")
    crash_point(STAGE, "logged")

    default = results[0][1]
    summary = (f"evaluate: eval accuracy {default['eval/rewards/accuracies']:.2f}, "
               f"margin {default['eval/rewards/margins']:.3f}")
    if "eval/win_rate" in default:
        summary += ", " + win_rate_summary(default)
    summary += "".join(f"; set {s.name}: {_set_line(s, m)}" for s, m, _ in results[1:])
    named = {s.name: {"prefix": s.prefix, "samples": str(written[s.name][0]), "num_prompts": len(table),
                      "outputs": [str(f) for f in written[s.name]]} for s, _, table in results[1:]}
    result = {
        "stage": STAGE, "fingerprint": fp, "run_dir": str(run_dir), "reused": False, "seconds": t.seconds,
        "metrics": metrics, "samples": str(out / "samples.jsonl"),
        "plots": [str(p) for p in pngs],
        "outputs": [str(out / "metrics.json"), str(out / "samples.jsonl"), *(str(p) for p in pngs),
                    *(f for n in named.values() for f in n["outputs"])],
        **({"sets": named} if named else {}),
        "summary": summary + f" in {t.seconds:.1f}s",
    }
    return record(STAGE, fp, result)
