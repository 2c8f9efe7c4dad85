"""Stage 3: DPO training of the policy against the cached reference log-probs (or, with a PEFT
adapter and ``reference.source: adapter_disabled``, against the policy with its adapter off; with
``reference.source: model``, against a reference model run online). With ``train.num_processes > 1``
or ``train.accelerate_config`` the stage runs under ``accelerate launch`` (:mod:`dpo_engine.stages.launch`): every rank runs this same function."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from data_contracts.config import RunConfig
from data_contracts.helpers import fingerprint, redact_credentials, write_json, write_text
from data_contracts.sources import source_fingerprint
from data_contracts.state import mlflow_uri
from data_contracts.validation import read_valid
from dpo_engine import progress, tracking
from dpo_engine.evaluation import preference_metrics
from dpo_engine.modeling import (
    VisionInputs,
    apply_adapter,
    check_config,
    check_vision_run,
    export_model,
    freeze_vision,
    language_model_peft,
    load_model,
    load_processor,
    load_tokenizer,
    model_fingerprint,
    packed_attention,
    pick_device,
)
from dpo_engine.reference import read_cache, training_reference
from dpo_engine.stages import launch
from dpo_engine.stages.index import claim_partial, record, reused
from dpo_engine.stages.runtime import Timer, code_version, crash_point
from dpo_engine.sweep import stop_rule
from dpo_engine.tracking.datasets import split_inputs
from dpo_engine.tracking.system_metrics import system_metrics
from dpo_engine.training import check_optim, extra_stop_rule, total_steps, train, world
from dpo_engine.training.sanity import reference_is_start

STAGE = "train"


def key(cfg: RunConfig, precomputed: dict) -> str:
    # the precompute's train/eval part: a named evaluation set (eval.sets) added or changed trains nothing again
    upstream = precomputed.get("training_fingerprint") or precomputed["fingerprint"]
    return fingerprint(STAGE, upstream, cfg.section_hash("loss", "train", "peft"),
                       cfg.reference.source if cfg.reference.source != "model" else cfg.section_hash("reference"),
                       cfg.model.init_kwargs,
                       source_fingerprint(cfg.peft.adapter_path) if cfg.peft.adapter_path else None,
                       *([] if cfg.model.freeze_vision else ["freeze_vision=false"]))  # older keys unchanged


def logged_params(cfg: RunConfig) -> dict:
    """The run config as the MLflow run's params (nested; ``tracking.log_params`` flattens them):
    every section, security settings such as ``model.trust_remote_code`` included. run_name is the
    MLflow run's name, not a param, so a re-run under a new name can continue it; user:password in
    ``tracking.mlflow_tracking_uri`` is not written down."""
    params = cfg.model_dump(mode="json", exclude={"run_name"})
    section = params.get("tracking") or {}
    if section.get("mlflow_tracking_uri"):
        section["mlflow_tracking_uri"] = redact_credentials(section["mlflow_tracking_uri"])
    return params


MADE_FOR = "made_for.json"  # the training fingerprint a train folder's checkpoints and MLflow run belong to


def set_aside_other_training(out: Path, fp: str, log=print) -> None:
    """A train folder holds the checkpoints and MLflow run of exactly one training: when ``out`` was
    made for another fingerprint (a re-run under the same run name with new data or config), or by
    a version that did not record one, it is moved aside (``train.other-<fp>``, said in one line) and
    this training starts afresh, never resuming the other one or returning its registered version."""
    marker = out / MADE_FOR
    try:
        made_for = json.loads(marker.read_text()).get("fingerprint")
    except (OSError, ValueError):
        made_for = None
    if made_for == fp:
        return
    if out.is_dir() and any((out / k).exists() for k in ("checkpoints", "mlflow_run_id", "model")):
        aside = out.with_name(f"{out.name}.other-{made_for or 'unrecorded'}-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        log(f"train: {out} held another training (fingerprint {made_for or 'not recorded'}, this one {fp}): "
            f"moved to {aside.name}; training afresh")
    write_json(marker, {"fingerprint": fp})


def run(cfg: RunConfig, run_dir: Path, validated: dict, precomputed: dict) -> dict:
    check_config(cfg)
    fp = key(cfg, precomputed)
    hit = reused(STAGE, fp, run_dir)
    if hit:
        return hit
    out = Path(run_dir) / STAGE
    if world()[0] == 0:
        set_aside_other_training(out, fp)
    if launch.wants_launch(cfg):  # every rank runs this function again, rank 0 records the result
        return launch.launch_stage(STAGE, cfg, run_dir, validated, precomputed)
    device = pick_device()
    check_optim(cfg.train, device)
    pairs = read_valid(validated["train"]["valid"])  # a damaged file: one line naming it
    ref = training_reference(cfg, validated, precomputed, pairs, device)
    tok = load_tokenizer(cfg.model, validated["model_path"])
    proc = load_processor(cfg.model, validated["model_path"], tok)  # a vision-language model's
    if proc is not None:
        check_vision_run(cfg)

    lead = world()[0] == 0  # a launched training's rank 0: it alone logs, checkpoints, exports, records
    log_step, run_id, outbox = (None, None, None)
    if lead:
        claim_partial(STAGE, fp, out)  # a crashed earlier run of this training: go on from its checkpoints
        run_id, outbox = _start_tracking(cfg, run_dir, fp, out, validated)
        log_step = outbox.log_metrics  # every train.logging_steps steps and at the last

    with Timer() as t:
        model = load_model(packed_attention(cfg.model, cfg.train.padding_free, device), validated["model_path"],
                           device, dropout_off=cfg.train.disable_dropout)
        frozen = proc is not None and cfg.model.freeze_vision
        if frozen:
            freeze_vision(model)
        if cfg.peft.enabled:  # a VLM with its vision tower frozen: the adapter on the language model only
            model = apply_adapter(model, language_model_peft(cfg.peft, frozen), seed=cfg.train.seed)
        vision = VisionInputs(proc, model) if proc is not None else None
        steps = total_steps(len(pairs), cfg.train)
        evaluate_fn = eval_callback(cfg, validated, precomputed, model, tok.pad_token_id, device, vision)
        lagging = stop_rule(run_dir)  # a sweep variant's "behind the best variant" stop, else None
        is_start, not_start = reference_is_start(cfg, validated["model_path"])  # step 1's check applies
        with tqdm(total=steps, desc="train", unit="step", disable=not lead) as bar, extra_stop_rule(lagging), \
                system_metrics(outbox, cfg.tracking.system_metrics_interval_s):  # rank 0's run: system/ metrics
            def on_step(step, m):
                if bar.n == 0 and step > 1:  # resumed from a checkpoint: the bar and its ETA start there
                    bar.n = bar.initial = step - 1
                bar.update(1)
                crash_point(STAGE, f"step-{step}")
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['rewards/accuracies']:.2f}",
                                margin=f"{m['rewards/margins']:.3f}")

            res = train(model, pairs, ref, loss_cfg=cfg.loss, cfg=cfg.train, pad_id=tok.pad_token_id,
                        out_dir=out, device=device, progress=on_step,
                        log_fn=progress.reported(log_step, STAGE, steps),  # and the UI's progress
                        evaluate_fn=evaluate_fn, ref_cfg=cfg.reference, vision=vision, reference_is_start=is_start)
        if not lead:
            return {}  # the other ranks took their share of every step; rank 0 has the result
        # a VLM's folder gets its processor (image processor, tokenizer, chat template)
        model_dir = export_model(model, proc or tok, out / "model", cfg.peft.export if cfg.peft.enabled else "merged",
                                 base_model_path=validated["model_path"])
        del model
        gc.collect()
    crash_point(STAGE, "exported")
    if res.best:
        outbox.log_metrics({"best_step": res.best["step"], "best_metric": res.best["value"]}, step=res.steps)
    outbox.drain(timeout_s=30.0)  # what is still pending is sent by the register stage
    write_json(out / "history.json", res.history)
    final = {k: v for k, v in res.final.items() if k != "step"}
    result = {
        "stage": STAGE, "fingerprint": fp, "run_dir": str(run_dir), "reused": False, "seconds": t.seconds,
        "model_dir": str(model_dir), "model_fingerprint": model_fingerprint(str(model_dir)),
        "mlflow_run_id": run_id, "steps": res.steps, "resumed_from": res.resumed_from,
        "stopped_early": res.stopped_early,
        "best": res.best, "reference_check": res.reference_check or {"skipped": not_start},
        "history": str(out / "history.json"),
        "outputs": [str(model_dir / ("adapter_config.json" if (model_dir / "adapter_config.json").is_file()
                                     else "config.json")), str(out / "history.json")],
        "metrics": final,
        "summary": (f"train: {res.steps} steps{' (early stop)' if res.stopped_early else ''} in {t.seconds:.1f}s, final loss {final.get('loss', float('nan')):.4f}, "
                    f"accuracy {final.get('rewards/accuracies', float('nan')):.2f}, "
                    f"margin {final.get('rewards/margins', float('nan')):.3f}"
                    + (f"; best {res.best['metric']} {res.best['value']:.4f} at step {res.best['step']}"
                       f"{' (exported)' if res.best.get('loaded') else ''}" if res.best else "")),
    }
    if lagging is not None and lagging.reason:  # decided by other variants: kept out of the reuse index
        result["stop_reason"] = lagging.reason
        result["summary"] += f"; {lagging.reason}"
        write_json(Path(run_dir) / f"{STAGE}.json", result)
        return result
    return record(STAGE, fp, result)


def _start_tracking(cfg: RunConfig, run_dir: Path, fp: str, out: Path, validated: dict):
    """The training's MLflow run (the same one when a retried or resumed training goes on) with the
    config as params, the git commit it runs from (``mlflow.source.git.commit``), the run folder's
    ``config.yaml`` as an artifact and the validated splits as its dataset inputs; and the outbox its
    step metrics go through (the artifact and inputs too: sent when MLflow answers)."""
    tracking.connect(mlflow_uri(cfg), retry=tracking.RetryPolicy.from_config(cfg.registry))
    id_file = out / "mlflow_run_id"
    commit = code_version()
    run_id = tracking.start_run(cfg.registry.experiment, Path(run_dir).name,
                                tags={"dpo.fingerprint": fp, "dpo.run_dir": str(run_dir),
                                      "dpo.base_model": cfg.model.name_or_path,
                                      **({"mlflow.source.git.commit": commit} if commit else {})},
                                run_id=id_file.read_text().strip() if id_file.is_file() else None)
    out.mkdir(parents=True, exist_ok=True)
    write_text(id_file, run_id)
    crash_point(STAGE, "mlflow-run")
    tracking.log_params(run_id, logged_params(cfg))
    # metrics kept on disk while MLflow is away, sent when it is back, by a thread: a server that
    # hangs never holds up a step
    outbox = tracking.Outbox(run_id, background=True)
    outbox.log_metrics(validated.get("metrics", {}))
    outbox.log_inputs(split_inputs(validated))
    if (Path(run_dir) / "config.yaml").is_file():  # written by the pipeline; a bare stage call may lack it
        outbox.log_artifact(Path(run_dir) / "config.yaml")
    return run_id, outbox


def eval_callback(cfg: RunConfig, validated: dict, precomputed: dict, model, pad_id: int, device, vision=None):
    """``step -> eval/ metrics`` of ``model`` on the eval split (its cached reference log-probs), or
    None when periodic evaluation is off or there is no eval split."""
    if not cfg.train.eval_steps or not precomputed.get("eval_ref") or not validated.get("eval"):
        return None
    pairs = read_valid(validated["eval"]["valid"])
    if pairs.empty:
        return None
    ref = read_cache(Path(precomputed["eval_ref"]), expect_ids=pairs["example_id"].tolist(),
                     expect_key=precomputed["eval_ref_key"])

    def evaluate(step: int) -> dict:
        return preference_metrics(model, pairs, ref, loss_cfg=cfg.loss, pad_id=pad_id,
                                  batch_size=cfg.eval.batch_size, chunk_size=cfg.train.logit_chunk_size,
                                  device=device, precision=cfg.train.precision, vision=vision)

    return evaluate
