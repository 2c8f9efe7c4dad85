"""DPO training against precomputed reference log-probs, or an online reference.

A plain loop: micro-batches of pairs, gradient accumulation with the loss normalised by the number
of pairs in the optimizer step (exact under accumulation), AdamW, warmup + linear/cosine schedule
(``optim``), gradient clipping, atomic checkpoints that a re-run resumes from (``checkpoints``: sizes
and sha256 in state.json: a damaged checkpoint is named and the previous one resumed), and TRL's
metric names (``observability``).

Only parameters that require grad are optimised (a PeftModel trains its adapter). The reference is
a frame of precomputed log-probs, ``None`` (the same PeftModel with its adapter disabled) or a frozen
reference model run online; with an online model, TR-DPO (``reference.sync_ref_model``,
``reference_sync``) moves it towards the policy every ``ref_model_sync_steps`` steps (checkpointed
with the policy). Under torch.distributed (``accelerate launch``, see ``dpo_engine.stages.launch``)
each rank takes its share of every step's pairs and the gradients are summed over ranks, each rank's
loss being normalised by the step's global pair count: the update equals the single-process one; the
logged metrics are gathered over ranks, and only rank 0 logs and writes checkpoints. Launched with an
FSDP accelerate config, the policy is sharded with FSDP2's ``fully_shard`` (``distributed``) with the
same update.

Options (issue #5): gradient checkpointing, 8-bit AdamW (bitsandbytes, CUDA), per-step peak memory
and MFU, periodic evaluation through an ``evaluate_fn(step)`` callback (logged with ``eval/`` names)
and early stopping on any logged metric (``stopping``). Mixture-of-experts policies add TRL's router
auxiliary loss, that of all the step's tokens whatever the split (``router_aux``).

Checks that catch broken runs (issue 18): with a reference that is the starting policy, step 1's
log-ratios must be 0 within the precision's rounding, else the run stops before any update
(``sanity``); the best checkpoint by ``train.metric_for_best_model`` is kept by the pruning and, with
``train.load_best_model_at_end``, its weights are the model's at the end (``best``).
"""

from __future__ import annotations

import math
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn

from data_contracts.config import LossConfig, ReferenceConfig, TrainConfig
from dpo_engine.modeling import (autocast, autocast_dtype, disable_dropout, is_peft, loss_from_config,
                                 reference_mode, set_seed)
# logps.X and optim.X are looked up at call time: tests patch logps.compile_layers and optim.make_scaler
from dpo_engine.modeling import logps
from dpo_engine.modeling.router import aux_loss_coef, router_of
from dpo_engine.training import optim
from dpo_engine.training.best import BestCheckpoint
from dpo_engine.training.checkpoints import (apply_trainer_state, latest_checkpoint, read_checkpoint,
                                             remove_crash_leftovers, resume, rng_state, save_checkpoint)
from dpo_engine.training.distributed import (FSDPRoot, agree, all_reduce_grads, check_fsdp, fsdp_settings,
                                             fsdp_wrap, gather_fsdp_state, unshard_in_place, unwrap_ddp,
                                             unwrap_fsdp, world)
from dpo_engine.training.errors import TrainingError
from dpo_engine.training.master_weights import MasterWeights
from dpo_engine.training.observability import (gather_records, logged_metrics, mfu, peak_memory_mb, peak_tflops,
                                               step_metrics, step_record)
from dpo_engine.training.reference_sync import sync_reference, tr_dpo_settings
from dpo_engine.training.router_aux import StepAux
from dpo_engine.training.sanity import StartCheck, compute_dtype, runtime_skip
from dpo_engine.training.stopping import should_stop


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    stopped_early: bool = False
    best: dict | None = None  # the best checkpoint (step, metric, value, checkpoint, loaded)
    reference_check: dict | None = None  # step 1's measured log-ratios, or {"skipped": why}

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def train(model: nn.Module, pairs: pd.DataFrame, ref: pd.DataFrame | nn.Module | None, *, loss_cfg: LossConfig,
          cfg: TrainConfig, pad_id: int, out_dir: Path, device: torch.device | str = "cpu",
          log_fn: Callable[[dict, int], None] | None = None,
          progress: Callable[[int, dict], None] | None = None, keep_checkpoints: int | None = None,
          evaluate_fn: Callable[[int], dict] | None = None,
          ref_cfg: ReferenceConfig | None = None, vision=None, reference_is_start: bool = False) -> TrainResult:
    """Train ``model`` in place on ``pairs`` (valid.parquet rows) against the reference ``ref``:
    precomputed log-probs (a frame), None (computed on the fly by ``model`` with its adapter disabled;
    ``model`` must be a PeftModel) or a frozen reference model run online on every micro-batch.
    ``ref_cfg.sync_ref_model`` (TR-DPO, online model only) updates that model in place every
    ``ref_cfg.ref_model_sync_steps`` steps: ref = alpha * policy + (1 - alpha) * ref.

    ``log_fn(metrics, step)`` receives TRL-named metrics every ``cfg.logging_steps`` optimizer steps
    (averaged over those steps, as TRL logs them) and at the last step; ``progress(step, metrics)``
    gets every step's own. Checkpoints go to ``out_dir/checkpoints`` every ``cfg.save_steps`` steps
    and at the end (the newest ``keep_checkpoints``, default ``cfg.save_total_limit``, are kept), with
    the random generators' states; a re-run resumes from the last one.
    ``evaluate_fn(step) -> {"eval/...": value}`` runs every ``cfg.eval_steps`` steps (the model is put
    back in train mode afterwards); its metrics join that step's and may drive early stopping.
    ``vision``: a vision-language model's ``modeling.vision.VisionInputs`` (the rows' image inputs).
    ``reference_is_start``: the caller states that ``ref`` is the starting policy (its log-probs, a
    copy of its weights, or its identity adapter off): step 1 then checks that the log-ratios are 0
    (``sanity``; off with ``cfg.check_reference_at_start=false``, skipped on a resume or with active
    dropout). The best checkpoint (``cfg.metric_for_best_model``) is recorded, kept by the pruning and,
    with ``cfg.load_best_model_at_end``, loaded back into ``model`` at the end (``best``).
    """
    device = torch.device(device)
    fsdp = fsdp_settings()
    set_seed(cfg.seed)
    keep = keep_checkpoints or cfg.save_total_limit
    if cfg.disable_dropout:  # also for a model passed in built (load_model already did it for its own)
        disable_dropout(model)
    records = pairs.to_dict("records")
    aux_coef = aux_loss_coef(cfg.router_aux_loss_coef, model)  # MoE: TRL's loss + coef * aux_loss
    router = router_of(model) if aux_coef > 0 else None
    reference = _reference(model, pairs, ref)
    sync = tr_dpo_settings(model, ref, ref_cfg)

    rank, n_ranks = world()
    bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    per_step = bs * accum * n_ranks
    steps = optim.total_steps(len(records), cfg)
    order = optim.pair_order(len(records), steps * per_step, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters")
    if n_ranks > 1:  # every rank starts from rank 0's weights (e.g. a freshly initialised adapter)
        for p in params:
            dist.broadcast(p.data, src=0)
    policy = model
    ckpt_dir = out_dir / "checkpoints"
    if rank == 0:
        remove_crash_leftovers(ckpt_dir)
    synced = ref if sync else None  # a reference that changes is checkpointed with the policy
    say = print if rank == 0 else (lambda _: None)
    last, loaded = None, None  # the checkpoint resumed from, (state, trainer.pt) read from it
    if fsdp is not None:  # shards in place; ``model`` becomes the root unit that runs the forward
        check_fsdp(cfg, sync, evaluate_fn)
        # the checkpoint's full weights into the plain policy, sharded next; trainer.pt applied below
        last, loaded = resume(ckpt_dir, lambda p: read_checkpoint(p, policy), say)
        model = fsdp_wrap(model, fsdp)
        params = [p for p in model.parameters() if p.requires_grad]
    master = MasterWeights(params, cfg.master_weights)  # fp32 copies of 16-bit weights
    if master.active and fsdp is not None:
        raise TrainingError("16-bit model weights with FSDP: load the model in float32 (model.dtype) and "
                            "let FSDP's mixed precision compute in bf16, or set train.master_weights=false")
    params = master.optimizer_params()  # from here on: the tensors whose gradients are stepped
    opt = optim.make_optimizer(params, cfg, device)
    sched = optim.make_scheduler(opt, cfg, steps)
    amp = autocast_dtype(cfg.precision, device)
    scaler = optim.make_scaler(device, enabled=amp == torch.float16)  # fp16: dynamic loss scaling
    overflows = 0  # consecutive fp16 steps skipped for overflowing gradients
    if cfg.gradient_checkpointing:
        unwrap_ddp(policy).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        if fsdp is not None:
            raise TrainingError("train.compile is not supported with FSDP yet; set train.compile=false")
        logps.compile_layers(unwrap_ddp(policy))
    peak = peak_tflops(cfg, device)
    n_params = sum(p.numel() for p in model.parameters())

    start, history = 0, []
    if fsdp is None:  # a damaged checkpoint is named and the next older one loaded instead
        last, loaded = resume(ckpt_dir, lambda p: read_checkpoint(p, unwrap_ddp(model), synced), say,
                               with_reference=synced is not None)
    if last is not None:
        state, blob = loaded
        apply_trainer_state(last, blob, opt, sched, fsdp_root=model if fsdp else None, master=master,
                            scaler=scaler)
        start, history = state["step"], state["history"]
        del loaded, blob
    best = BestCheckpoint(cfg, ckpt_dir, state.get("best") if last is not None else None, history)
    check, ref_check = None, None
    if reference_is_start and cfg.check_reference_at_start:
        skip = runtime_skip(model, start, cfg.disable_dropout)
        check = StartCheck(loss_cfg, compute_dtype(model, amp, device)) if skip is None else None
        ref_check = {"skipped": skip} if skip else None
    if n_ranks > 1:  # every rank read the same files; ranks that saw them differently must not go on
        starts = [None] * n_ranks
        dist.all_gather_object(starts, start)
        if len(set(starts)) > 1:
            raise TrainingError(f"the ranks resumed from different checkpoints in {ckpt_dir} (steps {starts}); "
                                "check that every rank sees the same files")
    seen = int(history[-1]["num_tokens"]) if history else 0  # cumulative, as TRL logs num_tokens
    stopped = agree(should_stop(history, cfg), n_ranks)
    model.train()
    step = start
    while step < steps and not stopped:
        t0 = time.perf_counter()
        step_idx = order[step * per_step:(step + 1) * per_step]
        n_pairs = len(step_idx)  # global: every rank normalises by the pairs of the whole step
        # sft/orpo's NLL is a token mean over the whole step's chosen tokens (not each micro-batch's)
        sft_tpp = sum(len(records[i]["chosen_input_ids"]) for i in step_idx) / n_pairs
        idx = step_idx[rank * bs * accum:(rank + 1) * bs * accum]
        outs, tokens = [], 0
        mbs = [idx[m0:m0 + bs] for m0 in range(0, len(idx), bs)]
        aux = None if router is None else StepAux(router, aux_coef, len(mbs), n_ranks, n_ranks if fsdp else 1)
        if aux is not None and len(mbs) > 1:  # the step's aux needs every micro-batch's router logits
            _router_prepass(model, [[records[i] for i in sel] for sel in mbs], aux, pad_id, cfg, device, amp,
                            vision)
        for k, sel in enumerate(mbs):
            out, pc, pr, rc, rr, seq, n_tok = _micro_step(model, [records[i] for i in sel], sel, reference,
                                                  n_pairs / (n_ranks if fsdp else 1), pad_id, loss_cfg, cfg,
                                                  device, amp, scaler, sft_tpp, vision=vision,
                                                  aux=None if aux is None else (aux, k))
            master.grads_in()
            if check is not None and step == 0:
                check.add([records[i]["example_id"] for i in sel], out, pc, pr, rc, rr, seq["n_tokens"])
            outs.append(step_record(out, pc, pr, seq))
            tokens += n_tok
        if check is not None and step == 0:  # before any update: a mismatched reference stops the run here
            ref_check = check.verify(n_ranks)
        loss_sum = torch.tensor([sum(o["losses"].sum().item() for o in outs), float(tokens)],
                                dtype=torch.float64)
        if n_ranks > 1:
            if fsdp is None:  # FSDP has reduce-scattered (summed) the gradients in backward
                all_reduce_grads(params)
            dist.all_reduce(loss_sum)
            outs = gather_records(outs, n_ranks)
        scaler.unscale_(opt)  # fp16: the gradients back to their true size before clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor
        loss_val, tokens = loss_sum[0].item() / n_pairs, int(loss_sum[1].item())
        if aux is not None:  # the optimised loss, as TRL logs it
            loss_val += aux_coef * aux.value
        overflow = scaler.is_enabled() and math.isfinite(loss_val) and not torch.isfinite(grad_norm)
        overflows = overflows + 1 if overflow else 0
        if not math.isfinite(loss_val) or (not torch.isfinite(grad_norm) and not overflow) \
                or overflows > optim.MAX_OVERFLOW_SKIPS:
            why = f" ({overflows} steps in a row skipped for fp16 overflow)" if overflows else ""
            kept = latest_checkpoint(ckpt_dir, log=lambda _: None) if rank == 0 else None
            raise TrainingError(f"non-finite loss/gradient at step {step + 1} (loss={loss_val}, "
                                f"grad_norm={grad_norm.item()}){why}; "
                                + (f"last good checkpoint kept: {kept}" if kept else
                                   "no checkpoint was written before it (train.save_steps)"))
        lr = sched.get_last_lr()[0]
        loss_scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(opt)  # an overflowing fp16 step is skipped (weights unchanged)
        scaler.update()
        master.weights_out()
        with warnings.catch_warnings():  # a skipped fp16 step still advances the schedule (as HF's)
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
            sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if sync and step % sync[1] == 0:
            sync_reference(model, ref, sync[0])
        seconds = time.perf_counter() - t0
        seen += tokens
        metrics = step_metrics(outs, grad_norm.item(), lr, tokens, seconds)
        if aux is not None:
            metrics["loss"], metrics["aux_loss"] = loss_val, aux.value
        metrics["num_tokens"] = float(seen)
        metrics["peak_memory_mb"] = peak_memory_mb(device)
        if loss_scale is not None:
            metrics["loss_scale"] = float(loss_scale)
            metrics["overflow_skipped"] = float(overflow)
        step_mfu = mfu(n_params, tokens, seconds, peak, n_ranks)
        if step_mfu is not None:
            metrics["mfu"] = step_mfu
        if evaluate_fn and cfg.eval_steps and step % cfg.eval_steps == 0:
            metrics.update(_evaluate(model, evaluate_fn, step))
        metrics["step"] = step
        history.append(metrics)
        stopped = agree(should_stop(history, cfg), n_ranks)
        last_step = step == steps or stopped
        if log_fn and rank == 0 and (step % cfg.logging_steps == 0 or last_step):
            log_fn(logged_metrics(history, cfg.logging_steps), step)
        if progress:
            progress(step, metrics)
        if last_step or (cfg.save_steps and step % cfg.save_steps == 0):
            best.update(step, metrics)  # a candidate: an evaluated step with a checkpoint
            _save_and_prune(ckpt_dir, step, model, opt, sched, history, keep, rank, n_ranks,
                            synced, master, scaler, best)
    if fsdp is not None:
        unshard_in_place(model)
    # rank 0 exports: its model gets the best weights back (load_best_model_at_end)
    best_out = best.at_end(unwrap_fsdp(unwrap_ddp(model))) if rank == 0 else best.record
    return TrainResult(steps=step, history=history, resumed_from=start, stopped_early=step < steps,
                       best=best_out, reference_check=ref_check)


def _reference(model, pairs: pd.DataFrame, ref):
    """The reference for ``_micro_step``: a frozen model (run online), None (the adapter-disabled
    policy) or (ref chosen, ref rejected) log-probs aligned with ``pairs``."""
    if isinstance(ref, nn.Module):
        if ref is unwrap_ddp(model):
            raise TrainingError("the reference model must be a separate model, not the policy itself")
        vocab = [m.get_output_embeddings().weight.shape[0] for m in (logps.unwrap_model(model), ref)]
        if vocab[0] != vocab[1]:
            raise TrainingError(f"the reference model's vocabulary has {vocab[1]} tokens, the policy's "
                                f"{vocab[0]}: they must share one tokenizer")
        ref.eval()
        ref.requires_grad_(False)
        return ref
    if ref is None:
        if not is_peft(model):
            raise TrainingError("no reference log-probs given and the model has no adapter to disable")
        return None
    ref_map = ref.set_index("example_id")
    missing = set(pairs["example_id"]) - set(ref_map.index)
    if missing:
        raise TrainingError(f"{len(missing)} training examples have no reference log-probs "
                            f"(e.g. {sorted(missing)[0]}); re-run precompute")
    return (torch.tensor(ref_map.loc[pairs["example_id"], "ref_chosen_logps"].to_numpy()),
            torch.tensor(ref_map.loc[pairs["example_id"], "ref_rejected_logps"].to_numpy()))


def _micro_step(model, mb: list[dict], sel: list[int], reference, n_pairs: float, pad_id: int,
                loss_cfg: LossConfig, cfg: TrainConfig, device: torch.device, amp: torch.dtype | None,
                scaler: torch.amp.GradScaler, sft_tokens_per_pair: float | None = None, vision=None,
                aux: tuple[StepAux, int] | None = None):
    """Forward + backward of one micro-batch; the loss is normalised by the pairs of the whole step
    (and multiplied by the fp16 loss scale, a no-op otherwise), an SFT term by the step's chosen
    tokens (``sft_tokens_per_pair`` = those tokens / the step's pairs). ``aux`` (the step's router
    aux loss, this micro-batch's index): the policy forward returns its router logits and the loss
    gets their aux surrogate (``router_aux``); the reference forward computes no router logits."""
    fwd = _forward_kwargs(loss_cfg, cfg, device, vision)
    with autocast(amp, device):
        fw = _policy_logps(model, mb, pad_id, with_stats=True, grad_filter_eps=cfg.grad_filter_eps,
                           router_logits=aux is not None, **fwd)
        if reference is None or isinstance(reference, nn.Module):
            with torch.no_grad(), (reference_mode(unwrap_fsdp(model)) if reference is None else nullcontext()):
                fr = _policy_logps(model, mb, pad_id, **fwd) if reference is None else \
                    logps.pair_logps(reference, mb, pad_id, **fwd)
            rc, rr = fr["chosen"].double(), fr["rejected"].double()
        else:
            rc, rr = reference[0][sel].to(device), reference[1][sel].to(device)
    pc, pr = fw["chosen"], fw["rejected"]
    out = loss_from_config(loss_cfg, pc, pr, rc, rr, ld_weighted=fw["ld_weighted"],
                           sft_tokens_per_pair=sft_tokens_per_pair, **fw["loss_inputs"])
    total = out.losses.sum() / n_pairs
    if aux is not None:
        total = total + aux[0].surrogate(aux[1], fw["seq"]["router_logits"], fw["batch"].attention_mask)
    scaler.scale(total).backward()
    return out, pc.detach(), pr.detach(), rc, rr, fw["seq"], fw["batch"].num_tokens


def _forward_kwargs(loss_cfg: LossConfig, cfg: TrainConfig, device: torch.device, vision) -> dict:
    return dict(loss_cfg=loss_cfg, chunk_size=cfg.logit_chunk_size, device=device,
                padding_free=cfg.padding_free, pad_to_multiple_of=cfg.pad_to_multiple_of, vision=vision)


def _router_prepass(model, mbs: list[list[dict]], aux: StepAux, pad_id: int, cfg: TrainConfig,
                    device: torch.device, amp: torch.dtype | None, vision) -> None:
    """Router logits of micro-batches 2.. of the step, forwarded without gradient before the first
    backward (the first micro-batch's come from its own training forward)."""
    with torch.no_grad(), autocast(amp, device):
        for k in range(1, len(mbs)):
            fw = _policy_logps(model, mbs[k], pad_id, router_logits=True,
                               **_forward_kwargs(None, cfg, device, vision))
            aux.record(k, fw["seq"]["router_logits"], fw["batch"].attention_mask)


def _policy_logps(model: nn.Module, *args, **kwargs) -> dict:
    if isinstance(model, FSDPRoot):
        return model(logps.pair_logps, *args, **kwargs)
    return logps.pair_logps(model, *args, **kwargs)


def _evaluate(model: nn.Module, evaluate_fn: Callable[[int], dict], step: int) -> dict:
    try:
        return {k if k.startswith("eval/") else f"eval/{k}": float(v) for k, v in evaluate_fn(step).items()}
    finally:
        model.train()


def _save_and_prune(ckpt_dir: Path, step: int, model, opt, sched, history: list[dict], keep: int,
                    rank: int, n_ranks: int, ref_model: nn.Module | None, master: MasterWeights,
                    scaler: torch.amp.GradScaler, best: BestCheckpoint) -> None:
    full = gather_fsdp_state(model, opt) if isinstance(model, FSDPRoot) else None  # every rank takes part
    rng = [rng_state()]
    if n_ranks > 1:
        rng = [None] * n_ranks
        dist.all_gather_object(rng, rng_state())
    if rank == 0:
        save_checkpoint(ckpt_dir, step, unwrap_fsdp(unwrap_ddp(model)), opt, sched, history, ref_model, full,
                        master, scaler, rng, best.record)
        for old in best.stale(keep):  # all but the newest ``keep``, the best one kept among them
            shutil.rmtree(old, ignore_errors=True)
    if n_ranks > 1:
        dist.barrier()
