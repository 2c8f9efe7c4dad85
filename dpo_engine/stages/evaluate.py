"""Stage 4: the trained policy against its reference, on held-out pairs and held-out prompts."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from data_contracts.config import RunConfig
from data_contracts.helpers import atomic_write, fingerprint, write_json
from data_contracts.state import mlflow_uri
from data_contracts.validation import read_valid
from dpo_engine import tracking
from dpo_engine.evaluation.benchmarks import local_tasks_fingerprint, run_benchmarks
from dpo_engine.evaluation import (
    generate,
    judge_table,
    kl_metrics,
    kl_sampling,
    length_metrics,
    load_judge,
    plots,
    preference_metrics,
    sample_kl,
    win_rate_summary,
)
from data_contracts.images import row_refs
from dpo_engine.modeling import (VisionInputs, load_model, load_processor, load_reference_model, load_tokenizer,
                                 pick_device)
from dpo_engine.reference import read_cache
from dpo_engine.stages.index import record, reused
from dpo_engine.stages.runtime import Timer, crash_point

STAGE = "evaluate"


def key(cfg: RunConfig, trained: dict) -> str:
    return fingerprint(STAGE, trained["fingerprint"], cfg.section_hash("eval"), cfg.reference.model_path or "",
                       local_tasks_fingerprint(cfg.eval.benchmarks))  # the local benchmark files' content


def _plots(out: Path, trained: dict, table: pd.DataFrame, metrics: dict) -> list[Path]:
    """Training curves (from the train stage's history.json) and judged eval scores, as PNGs."""
    history_file = Path(trained.get("history") or Path(trained["run_dir"]) / "train" / "history.json")
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    made = []
    for name, draw in (("training_curves.png", lambda p: plots.training_curves(history, p)),
                       ("eval_scores.png", lambda p: plots.eval_scores(table, metrics, p))):
        if atomic_write(out / name, draw) is not None:  # written whole, then renamed
            made.append(out / name)
    return made


def run(cfg: RunConfig, run_dir: Path, validated: dict, precomputed: dict, trained: dict) -> dict:
    fp = key(cfg, trained)
    hit = reused(STAGE, fp, run_dir)
    if hit:
        return hit
    out = Path(run_dir) / STAGE
    device = pick_device()
    judge = load_judge(cfg.eval.judge) if cfg.eval.judge else None
    pairs = read_valid(validated["eval"]["valid"])
    ref = read_cache(Path(precomputed["eval_ref"]), expect_ids=pairs["example_id"].tolist(),
                     expect_key=precomputed["eval_ref_key"])
    tok = load_tokenizer(cfg.model, validated["model_path"])
    proc = load_processor(cfg.model, validated["model_path"], tok)  # a vision-language model's
    with Timer() as t:
        policy = load_model(cfg.model, trained["model_dir"], device)
        vision = VisionInputs(proc, policy) if proc is not None else None
        metrics = preference_metrics(policy, pairs, ref, loss_cfg=cfg.loss, pad_id=tok.pad_token_id,
                                     batch_size=cfg.eval.batch_size,
                                     chunk_size=cfg.train.logit_chunk_size, device=device,
                                     precision=cfg.train.precision, vision=vision)
        table = pd.DataFrame()
        rows = pairs.head(cfg.eval.num_prompts).to_dict("records")
        if rows:
            # the model the policy was compared with in training: reference.model_path when set
            reference = load_reference_model(cfg.model, cfg.reference.model_path, validated["model_path"],
                                             device)
            prompts = [list(r["prompt_input_ids"]) for r in rows]
            images = {"images": [row_refs(r) for r in rows], "vision": vision}  # generation sees the images
            texts, generated = {}, {}
            for name, model in (("policy", policy), ("reference", reference)):
                with tqdm(total=len(prompts), desc=f"generate {name}", unit="prompt") as bar:
                    generated[name] = generate(model, tok, prompts, cfg.eval, device=device,
                                               progress=bar.update, **images)
                texts[name] = [tok.decode(x, skip_special_tokens=True) for x in generated[name]]
                metrics.update(length_metrics(name, generated[name], cfg.eval.max_new_tokens))
            # KL(policy || reference) on draws from the policy itself: its generations when they are
            # pure samples, else a separate sample at temperature 1 (greedy outputs would bias it)
            kl_cfg = kl_sampling(cfg.eval)
            samples = generated["policy"]
            if kl_cfg is not None:
                with tqdm(total=len(prompts), desc="sample policy (KL)", unit="prompt") as bar:
                    samples = generate(policy, tok, prompts, kl_cfg, device=device, progress=bar.update, **images)
            metrics.update(kl_metrics(sample_kl(policy, reference, prompts, samples, eos_id=tok.eos_token_id,
                                                pad_id=tok.pad_token_id, batch_size=cfg.eval.batch_size,
                                                max_new_tokens=cfg.eval.max_new_tokens, device=device, **images),
                                      seed=cfg.eval.seed))
            if judge is not None:
                table, judged = judge_table(rows, texts["policy"], texts["reference"], judge, seed=cfg.eval.seed)
                metrics.update(judged)
            else:
                table = pd.DataFrame({"prompt": [json.loads(r["prompt"]) for r in rows],
                                      "policy_response": texts["policy"],
                                      "reference_response": texts["reference"]})
            del reference
        # lm-evaluation-harness tasks (eval.benchmarks) on both models: bench/, bench_ref/, bench_delta/
        metrics.update(run_benchmarks(cfg.eval.benchmarks, policy, lambda: load_reference_model(
            cfg.model, cfg.reference.model_path, validated["model_path"], device), tok))
        del policy
        gc.collect()
    crash_point(STAGE, "computed")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "samples.jsonl", lambda tmp: table.to_json(tmp, orient="records", lines=True,
                                                                   force_ascii=False))
    pngs = _plots(out, trained, table, metrics)
    write_json(out / "metrics.json", metrics)
    crash_point(STAGE, "written")

    # through the run's outbox: an unreachable MLflow does not stop evaluation; what it could not
    # take is sent by the register stage, which waits for the server
    run_id = trained["mlflow_run_id"]
    tracking.connect(mlflow_uri(cfg), retry=tracking.RetryPolicy.from_config(cfg.registry), check=False)
    outbox = tracking.Outbox(run_id)
    # at the training's last step, where the periodic evaluation's curves end (not at step 0 below them)
    outbox.log_metrics(metrics, step=trained.get("steps") or 0)
    for f in [out / "samples.jsonl", out / "metrics.json", *pngs]:
        outbox.log_artifact(f, "evaluation")
    if not table.empty:
        outbox.log_table(out / "samples.jsonl", "evaluation/samples_table.json")
    crash_point(STAGE, "logged")

    summary = (f"evaluate: eval accuracy {metrics['eval/rewards/accuracies']:.2f}, "
               f"margin {metrics['eval/rewards/margins']:.3f}")
    if "eval/win_rate" in metrics:
        summary += ", " + win_rate_summary(metrics)
    result = {
        "stage": STAGE, "fingerprint": fp, "run_dir": str(run_dir), "reused": False, "seconds": t.seconds,
        "metrics": metrics, "samples": str(out / "samples.jsonl"),
        "plots": [str(p) for p in pngs],
        "outputs": [str(out / "metrics.json"), str(out / "samples.jsonl"), *(str(p) for p in pngs)],
        "summary": summary + f" in {t.seconds:.1f}s",
    }
    return record(STAGE, fp, result)
