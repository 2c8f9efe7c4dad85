"""DPO training against precomputed reference log-probs, or an online reference.

A plain loop: micro-batches of pairs, gradient accumulation with the loss normalised by the number
of pairs in the optimizer step (exact under accumulation), AdamW, warmup + linear/cosine schedule,
gradient clipping, atomic checkpoints that a re-run resumes from (dpo_engine/checkpoints.py: sizes and sha256 in
state.json: a damaged checkpoint is named and the previous one resumed), and TRL's metric names.

Only parameters that require grad are optimised (a PeftModel trains its adapter). The reference is
a frame of precomputed log-probs, ``None`` (the same PeftModel with its adapter disabled) or a frozen
reference model run online; with an online model, TR-DPO (``reference.sync_ref_model``) moves it
towards the policy every ``ref_model_sync_steps`` steps (checkpointed with the policy). Under
torch.distributed (``accelerate launch``, see ``dpo_engine.launch``) each rank takes its share of every
step's pairs and the gradients are summed over ranks, each rank's loss being normalised by the step's
global pair count: the update equals the single-process one; the logged metrics are gathered over
ranks, and only rank 0 logs and writes checkpoints. Launched with an FSDP accelerate config, the policy
is sharded with FSDP2's ``fully_shard`` (``fsdp_settings``, ``_fsdp_wrap``) with the same update.

Options (issue #5): gradient checkpointing, 8-bit AdamW (bitsandbytes, CUDA), per-step peak memory
and MFU, periodic evaluation through an ``evaluate_fn(step)`` callback (logged with ``eval/`` names)
and early stopping on any logged metric.
"""

from __future__ import annotations

import math
import os
import sys
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
from dpo_engine.modeling import is_peft, reference_mode
from dpo_engine.training.checkpoints import apply_trainer_state, latest_checkpoint, read_checkpoint, remove_crash_leftovers, resume, rng_state, save_checkpoint
from dpo_engine.modeling import sequence_logps
from dpo_engine.modeling import pair_logps, unwrap_model
from dpo_engine.modeling import loss_from_config, pair_metrics
from dpo_engine.training.master_weights import MasterWeights
from dpo_engine.modeling import autocast, autocast_dtype, disable_dropout, set_seed


class TrainingError(RuntimeError):
    pass


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    stopped_early: bool = False

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def total_steps(n_pairs: int, cfg: TrainConfig) -> int:
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world()[1]
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * n_pairs / per_step))


def pair_order(n_pairs: int, n_needed: int, seed: int) -> list[int]:
    """Pair indices for the whole run: one seeded permutation per epoch, concatenated."""
    order: list[int] = []
    epoch = 0
    while len(order) < n_needed:
        g = torch.Generator().manual_seed(seed + epoch)
        order += torch.randperm(n_pairs, generator=g).tolist()
        epoch += 1
    return order[:n_needed]


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    warmup = int(round(cfg.warmup_ratio * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler_type == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if cfg.lr_scheduler_type == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1 - progress)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def check_optim(cfg: TrainConfig, device: torch.device | str) -> None:
    """Fail before any model is loaded when ``train.optim`` cannot run here."""
    if cfg.optim != "adamw_8bit":
        return
    if torch.device(device).type != "cuda":
        raise TrainingError(f"train.optim: adamw_8bit needs a CUDA device (training runs on {device}); "
                            "use adamw_torch")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainingError("train.optim: adamw_8bit needs the bitsandbytes package "
                            "(pip install bitsandbytes); use adamw_torch") from None


MAX_OVERFLOW_SKIPS = 25  # fp16: more consecutive overflowing steps than this is a diverged run


def make_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 (disabled: every call is a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=enabled)


def make_optimizer(params: list[torch.Tensor], cfg: TrainConfig, device) -> torch.optim.Optimizer:
    check_optim(cfg, device)
    kw = dict(lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(cfg.adam_beta1, cfg.adam_beta2))
    if cfg.optim == "adamw_8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


# ------------------------------------------------------------------------------ observability

# Dense bf16 peak TFLOP/s of one GPU, matched on a substring of its name (first match wins).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
               "L4": 121.0, "A10": 125.0, "V100": 125.0, "T4": 65.0}


def peak_tflops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops:
        return cfg.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the start; elsewhere: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB on Linux
        return kb / 2**20 if sys.platform == "darwin" else kb / 1024
    except ImportError:  # Windows
        import psutil
        return psutil.Process().memory_info().peak_wset / 2**20


def mfu(n_params: int, tokens: int, seconds: float, peak: float | None, n_devices: int) -> float | None:
    """6·N·tokens / (seconds · peak FLOP/s of all devices): the usual dense-training estimate."""
    if not peak:
        return None
    return 6 * n_params * tokens / (max(seconds, 1e-9) * peak * 1e12 * n_devices)


# Metrics that are a running total or a high-water mark: logged as of the logging step, not averaged.
LAST_VALUE_METRICS = ("num_tokens", "peak_memory_mb", "learning_rate", "loss_scale")


def logged_metrics(history: list[dict], every: int) -> dict[str, float]:
    """What ``log_fn`` gets at a logging step, as TRL logs: each metric's mean over the steps since
    the previous logging step (``every`` steps, fewer at the end), totals and peaks as of now, and
    eval/ metrics as last evaluated in that window."""
    step = history[-1]["step"]
    window = [h for h in history if h["step"] > step - (step - 1) % every - 1]
    out: dict[str, float] = {}
    for name in dict.fromkeys(k for h in window for k in h):
        values = [h[name] for h in window if name in h]
        if name == "step":
            continue
        out[name] = values[-1] if name in LAST_VALUE_METRICS or name.startswith("eval/") else \
            sum(values) / len(values)
    return out


# ------------------------------------------------------------------------------ early stopping

from contextlib import contextmanager  # noqa: E402
from contextvars import ContextVar  # noqa: E402

# Extra stop rules ``rule(history) -> bool`` installed around a ``train`` call with
# ``extra_stop_rule`` (e.g. a sweep's "this variant lags behind the best one", dpo_engine/sweep.py).
_EXTRA_RULES: ContextVar[tuple] = ContextVar("dpo_extra_stop_rules", default=())


@contextmanager
def extra_stop_rule(rule: Callable[[list[dict]], bool] | None):
    """While the block runs, ``should_stop`` also stops when ``rule(history)`` is true
    (None: no extra rule). Thread-local: parallel trainings each see their own rules."""
    token = _EXTRA_RULES.set(_EXTRA_RULES.get() + ((rule,) if rule is not None else ()))
    try:
        yield
    finally:
        _EXTRA_RULES.reset(token)


def should_stop(history: list[dict], cfg: TrainConfig) -> bool:
    """True when ``cfg.early_stopping_metric`` has not improved over its best for ``patience``
    evaluations, or when an ``extra_stop_rule`` says so. Derived from the history (and, for an extra
    rule, what it reads), so a resumed run decides the same way."""
    if any(rule(history) for rule in _EXTRA_RULES.get()):
        return True
    name = cfg.early_stopping_metric
    if not name:
        return False
    values = [h[name] for h in history if name in h]
    best, since = None, 0
    for v in values:
        better = best is None or (v > best if cfg.early_stopping_mode == "max" else v < best)
        best, since = (v, 0) if better else (best, since + 1)
    return since >= cfg.early_stopping_patience


# ------------------------------------------------------------------------------ the loop

def train(model: nn.Module, pairs: pd.DataFrame, ref: pd.DataFrame | nn.Module | None, *, loss_cfg: LossConfig,
          cfg: TrainConfig, pad_id: int, out_dir: Path, device: torch.device | str = "cpu",
          log_fn: Callable[[dict, int], None] | None = None,
          progress: Callable[[int, dict], None] | None = None, keep_checkpoints: int | None = None,
          evaluate_fn: Callable[[int], dict] | None = None,
          ref_cfg: ReferenceConfig | None = None) -> TrainResult:
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
    """
    device = torch.device(device)
    fsdp = fsdp_settings()
    set_seed(cfg.seed)
    keep = keep_checkpoints or cfg.save_total_limit
    if cfg.disable_dropout:  # also for a model passed in built (load_model already did it for its own)
        disable_dropout(model)
    records = pairs.to_dict("records")
    reference = _reference(model, pairs, ref)
    sync = _tr_dpo(model, ref, ref_cfg)

    rank, n_ranks = world()
    bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    per_step = bs * accum * n_ranks
    steps = total_steps(len(records), cfg)
    order = pair_order(len(records), steps * per_step, cfg.seed)
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
        _check_fsdp(cfg, sync, evaluate_fn)
        # the checkpoint's full weights into the plain policy, sharded next; trainer.pt applied below
        last, loaded = resume(ckpt_dir, lambda p: read_checkpoint(p, policy), say)
        model = _fsdp_wrap(model, fsdp)
        params = [p for p in model.parameters() if p.requires_grad]
    master = MasterWeights(params, cfg.master_weights)  # fp32 copies of 16-bit weights
    if master.active and fsdp is not None:
        raise TrainingError("16-bit model weights with FSDP: load the model in float32 (model.dtype) and "
                            "let FSDP's mixed precision compute in bf16, or set train.master_weights=false")
    params = master.optimizer_params()  # from here on: the tensors whose gradients are stepped
    opt = make_optimizer(params, cfg, device)
    sched = make_scheduler(opt, cfg, steps)
    amp = autocast_dtype(cfg.precision, device)
    scaler = make_scaler(device, enabled=amp == torch.float16)  # fp16: dynamic loss scaling
    overflows = 0  # consecutive fp16 steps skipped for overflowing gradients
    if cfg.gradient_checkpointing:
        _unwrap_ddp(policy).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        if fsdp is not None:
            raise TrainingError("train.compile is not supported with FSDP yet; set train.compile=false")
        sequence_logps.compile_layers(_unwrap_ddp(policy))
    peak = peak_tflops(cfg, device)
    n_params = sum(p.numel() for p in model.parameters())

    start, history = 0, []
    if fsdp is None:  # a damaged checkpoint is named and the next older one loaded instead
        last, loaded = resume(ckpt_dir, lambda p: read_checkpoint(p, _unwrap_ddp(model), synced), say,
                               with_reference=synced is not None)
    if last is not None:
        state, blob = loaded
        apply_trainer_state(last, blob, opt, sched, fsdp_root=model if fsdp else None, master=master,
                            scaler=scaler)
        start, history = state["step"], state["history"]
        del loaded, blob
    if n_ranks > 1:  # every rank read the same files; ranks that saw them differently must not go on
        starts = [None] * n_ranks
        dist.all_gather_object(starts, start)
        if len(set(starts)) > 1:
            raise TrainingError(f"the ranks resumed from different checkpoints in {ckpt_dir} (steps {starts}); "
                                "check that every rank sees the same files")
    seen = int(history[-1]["num_tokens"]) if history else 0  # cumulative, as TRL logs num_tokens
    stopped = _agree(should_stop(history, cfg), n_ranks)
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
        for m0 in range(0, len(idx), bs):
            sel = idx[m0:m0 + bs]
            out, pc, pr, seq, n_tok = _micro_step(model, [records[i] for i in sel], sel, reference,
                                                  n_pairs / (n_ranks if fsdp else 1), pad_id, loss_cfg, cfg,
                                                  device, amp, scaler, sft_tpp)
            master.grads_in()
            outs.append(_record(out, pc, pr, seq))
            tokens += n_tok
        loss_sum = torch.tensor([sum(o["losses"].sum().item() for o in outs), float(tokens)],
                                dtype=torch.float64)
        if n_ranks > 1:
            if fsdp is None:  # FSDP has reduce-scattered (summed) the gradients in backward
                _all_reduce_grads(params)
            dist.all_reduce(loss_sum)
            outs = _gather_records(outs, n_ranks)
        scaler.unscale_(opt)  # fp16: the gradients back to their true size before clipping
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor
        loss_val, tokens = loss_sum[0].item() / n_pairs, int(loss_sum[1].item())
        overflow = scaler.is_enabled() and math.isfinite(loss_val) and not torch.isfinite(grad_norm)
        overflows = overflows + 1 if overflow else 0
        if not math.isfinite(loss_val) or (not torch.isfinite(grad_norm) and not overflow) \
                or overflows > MAX_OVERFLOW_SKIPS:
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
        metrics = _step_metrics(outs, grad_norm.item(), lr, tokens, seconds)
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
        stopped = _agree(should_stop(history, cfg), n_ranks)
        last_step = step == steps or stopped
        if log_fn and rank == 0 and (step % cfg.logging_steps == 0 or last_step):
            log_fn(logged_metrics(history, cfg.logging_steps), step)
        if progress:
            progress(step, metrics)
        if last_step or (cfg.save_steps and step % cfg.save_steps == 0):
            _save_and_prune(ckpt_dir, step, model, opt, sched, history, keep, rank, n_ranks,
                            synced, master, scaler)
    if fsdp is not None:
        _unshard_in_place(model)
    return TrainResult(steps=step, history=history, resumed_from=start, stopped_early=step < steps)


def _reference(model, pairs: pd.DataFrame, ref):
    """The reference for ``_micro_step``: a frozen model (run online), None (the adapter-disabled
    policy) or (ref chosen, ref rejected) log-probs aligned with ``pairs``."""
    if isinstance(ref, nn.Module):
        if ref is _unwrap_ddp(model):
            raise TrainingError("the reference model must be a separate model, not the policy itself")
        vocab = [m.get_output_embeddings().weight.shape[0] for m in (unwrap_model(model), ref)]
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
                scaler: torch.amp.GradScaler, sft_tokens_per_pair: float | None = None):
    """Forward + backward of one micro-batch; the loss is normalised by the pairs of the whole step
    (and multiplied by the fp16 loss scale, a no-op otherwise), an SFT term by the step's chosen
    tokens (``sft_tokens_per_pair`` = those tokens / the step's pairs)."""
    fwd = dict(loss_cfg=loss_cfg, chunk_size=cfg.logit_chunk_size, device=device,
               padding_free=cfg.padding_free, pad_to_multiple_of=cfg.pad_to_multiple_of)
    with autocast(amp, device):
        fw = _policy_logps(model, mb, pad_id, with_stats=True, grad_filter_eps=cfg.grad_filter_eps, **fwd)
        if reference is None or isinstance(reference, nn.Module):
            with torch.no_grad(), (reference_mode(_inner(model)) if reference is None else nullcontext()):
                fr = _policy_logps(model, mb, pad_id, **fwd) if reference is None else \
                    pair_logps(reference, mb, pad_id, **fwd)
            rc, rr = fr["chosen"].double(), fr["rejected"].double()
        else:
            rc, rr = reference[0][sel].to(device), reference[1][sel].to(device)
    pc, pr = fw["chosen"], fw["rejected"]
    out = loss_from_config(loss_cfg, pc, pr, rc, rr, ld_weighted=fw["ld_weighted"],
                           sft_tokens_per_pair=sft_tokens_per_pair, **fw["loss_inputs"])
    scaler.scale(out.losses.sum() / n_pairs).backward()
    return out, pc.detach(), pr.detach(), fw["seq"], fw["batch"].num_tokens


def _evaluate(model: nn.Module, evaluate_fn: Callable[[int], dict], step: int) -> dict:
    try:
        return {k if k.startswith("eval/") else f"eval/{k}": float(v) for k, v in evaluate_fn(step).items()}
    finally:
        model.train()


def _save_and_prune(ckpt_dir: Path, step: int, model, opt, sched, history: list[dict], keep: int,
                    rank: int, n_ranks: int, ref_model: nn.Module | None = None,
                    master: MasterWeights | None = None, scaler: torch.amp.GradScaler | None = None) -> None:
    full = _gather_fsdp_state(model, opt) if isinstance(model, _FSDPRoot) else None  # every rank takes part
    rng = [rng_state()]
    if n_ranks > 1:
        rng = [None] * n_ranks
        dist.all_gather_object(rng, rng_state())
    if rank == 0:
        save_checkpoint(ckpt_dir, step, _inner(_unwrap_ddp(model)), opt, sched, history, ref_model, full,
                        master, scaler, rng)
        for old in sorted(ckpt_dir.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if n_ranks > 1:
        dist.barrier()


# ------------------------------------------------------------------------------ FSDP

def fsdp_settings() -> dict | None:
    """The FSDP settings that ``accelerate launch`` puts in every rank's environment for an accelerate
    config with ``distributed_type: FSDP`` (None without one)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("1", "true"):
        return None
    return {"version": os.environ.get("FSDP_VERSION", "1"),
            "layers": [c for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()],
            "reshard": os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in
            ("false", "0", "shard_grad_op", "no_shard"),
            "offload": os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"}


def _check_fsdp(cfg: TrainConfig, sync, evaluate_fn) -> None:
    for bad, why in ((sync is not None, "reference.sync_ref_model (TR-DPO mixes full weights)"),
                     (evaluate_fn is not None and cfg.eval_steps > 0, "train.eval_steps (periodic evaluation)"),
                     (cfg.precision == "fp16", "train.precision=fp16 (loss scaling of sharded gradients); "
                                               "use bf16")):
        if bad:
            raise TrainingError(f"FSDP (train.accelerate_config) does not support {why} yet")


class _FSDPRoot(nn.Module):
    """FSDP's root unit around the policy. The fused head calls the body and reads the LM head's
    weight itself, not through the model's forward, so the whole log-prob computation runs inside this
    module's forward, where FSDP has gathered the root-level parameters (embeddings, final norm, head)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, fn, *args, **kwargs):
        return fn(self.lm, *args, **kwargs)


def _inner(model: nn.Module) -> nn.Module:
    return model.lm if isinstance(model, _FSDPRoot) else model


def _policy_logps(model: nn.Module, *args, **kwargs) -> dict:
    if isinstance(model, _FSDPRoot):
        return model(pair_logps, *args, **kwargs)
    return pair_logps(model, *args, **kwargs)


def _fsdp_wrap(model: nn.Module, fsdp: dict) -> _FSDPRoot:
    """FSDP2 (``fully_shard``): each transformer layer (the config's ``fsdp_transformer_layer_cls_to_wrap``,
    else the model's ``_no_split_modules``) is a unit, the rest is the root unit. FSDP averages the
    gradients over ranks (gloo has no pre-scaled sum), so each rank's loss is normalised by the step's
    global pairs / world size: the same sum as the replicated path."""
    import warnings

    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    if fsdp["version"] != "2":
        raise TrainingError("FSDP: set fsdp_config.fsdp_version: 2 in train.accelerate_config "
                            "(this trainer shards with FSDP2's fully_shard)")
    names = set(fsdp["layers"]) or set(getattr(unwrap_model(model), "_no_split_modules", None) or [])
    kw = {"reshard_after_forward": fsdp["reshard"],
          "offload_policy": CPUOffloadPolicy() if fsdp["offload"] else OffloadPolicy()}
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise TrainingError(f"FSDP: no module of class {', '.join(sorted(names)) or '?'} in the model; set "
                            "fsdp_config.fsdp_transformer_layer_cls_to_wrap to its decoder layer class")
    for layer in layers:
        fully_shard(layer, **kw)
    root = _FSDPRoot(model)
    fully_shard(root, **kw)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # chosen/rejected are slices
    return root


def _gather_fsdp_state(root: _FSDPRoot, opt) -> tuple[dict, dict]:
    """Full (model, optimizer) state dicts on rank 0 (empty elsewhere), keyed like the policy's own."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = {k.removeprefix("lm."): v for k, v in get_model_state_dict(root, options=options).items()}
    return weights, get_optimizer_state_dict(root, opt, options=options)


def _unshard_in_place(root: _FSDPRoot) -> None:
    """After training: the full weights gathered (all ranks take part) and put back into the policy as
    plain parameters on rank 0, which exports it; tied parameters stay tied."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:  # ranks > 0
        return
    done: dict[int, nn.Parameter] = {}
    for name, p in list(root.lm.named_parameters(remove_duplicate=False)):
        owner, _, leaf = name.rpartition(".")
        module = root.lm.get_submodule(owner)
        if id(p) not in done:
            done[id(p)] = nn.Parameter(full[f"lm.{name}"].to(p.device), requires_grad=p.requires_grad)
        module._parameters[leaf] = done[id(p)]


def _agree(flag: bool, n_ranks: int) -> bool:
    """Rank 0's decision on every rank (a stop rule may read what only rank 0 sees)."""
    if n_ranks == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum gradients over ranks (a missing gradient counts as zero)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


# ------------------------------------------------------------------------------ TR-DPO

def _tr_dpo(model, ref, ref_cfg: ReferenceConfig | None) -> tuple[float, int] | None:
    """(alpha, sync steps) when TR-DPO is on, after checking the reference can follow the policy."""
    if ref_cfg is None or not ref_cfg.sync_ref_model:
        return None
    if not isinstance(ref, nn.Module):
        raise TrainingError("reference.sync_ref_model needs an online reference model "
                            "(reference.source=model), not precomputed log-probs or the adapter-disabled policy")
    pol = [(n, p.shape) for n, p in _unwrap_ddp(model).named_parameters()]
    if is_peft(model) or pol != [(n, p.shape) for n, p in ref.named_parameters()]:
        raise TrainingError("reference.sync_ref_model: the reference model must have exactly the policy's "
                            "parameters (same architecture, no PEFT adapter on the policy) to be mixed with it")
    return ref_cfg.ref_model_mixup_alpha, ref_cfg.ref_model_sync_steps


@torch.no_grad()
def sync_reference(policy: nn.Module, ref_model: nn.Module, alpha: float) -> None:
    """TR-DPO's soft update (TRL's SyncRefModelCallback): ref = alpha * policy + (1 - alpha) * ref,
    parameter by parameter, in place."""
    for rp, pp in zip(ref_model.parameters(), _unwrap_ddp(policy).parameters()):
        rp.mul_(1.0 - alpha).add_(pp.detach().to(rp.dtype), alpha=alpha)


# ------------------------------------------------------------------------------ metrics

def _record(out, pc, pr, seq) -> dict:
    """What a micro-batch contributes to the step's metrics (detached, on the CPU)."""
    b = len(pc)
    return {"losses": out.losses.detach().cpu(), "chosen_rewards": out.chosen_rewards.detach().cpu(),
            "rejected_rewards": out.rejected_rewards.detach().cpu(), "pc": pc.cpu(), "pr": pr.cpu(),
            "entropy": seq["entropy_sum"].sum().item(),
            "logit_c": seq["mean_logit_sum"][:b].sum().item(), "logit_r": seq["mean_logit_sum"][b:].sum().item(),
            "correct_c": seq["correct_sum"][:b].sum().item(),
            "n_c": seq["n_tokens"][:b].sum().item(), "n_r": seq["n_tokens"][b:].sum().item()}


def _gather_records(outs: list[dict], n_ranks: int) -> list[dict]:
    """Every rank's micro-batch records, in rank order: the step's metrics cover all its pairs."""
    everyone: list = [None] * n_ranks
    dist.all_gather_object(everyone, outs)
    return [o for rank_outs in everyone for o in rank_outs]


def _step_metrics(outs, grad_norm: float, lr: float, tokens: int, seconds: float) -> dict:
    from dpo_engine.modeling import PairLoss

    cat = PairLoss(torch.cat([o["losses"] for o in outs]), torch.cat([o["chosen_rewards"] for o in outs]),
                   torch.cat([o["rejected_rewards"] for o in outs]))
    m = pair_metrics(cat, torch.cat([o["pc"] for o in outs]), torch.cat([o["pr"] for o in outs]))
    ent = sum(o["entropy"] for o in outs)
    ml_c, ml_r = sum(o["logit_c"] for o in outs), sum(o["logit_r"] for o in outs)
    n_c, n_r = sum(o["n_c"] for o in outs), sum(o["n_r"] for o in outs)
    m.update({
        "logits/chosen": ml_c / max(1, n_c), "logits/rejected": ml_r / max(1, n_r),
        "entropy": ent / max(1, n_c + n_r), "num_tokens": float(tokens), "grad_norm": grad_norm,
        # TRL: top-1 accuracy of the policy over the chosen completion tokens
        "mean_token_accuracy": sum(o["correct_c"] for o in outs) / max(1, n_c),
        "learning_rate": lr, "tokens_per_second": tokens / max(seconds, 1e-9),
    })
    return m
