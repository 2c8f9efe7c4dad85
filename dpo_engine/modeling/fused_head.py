"""Fused completion log-prob head: per-token log p(target) without an [N, V] logits tensor.

``token_logps(hidden [N, d], weight [V, d], targets [N])`` walks the vocabulary in tiles of
``chunk_size`` columns with an online logsumexp (fp32 accumulators), and in backward recomputes each
tile, accumulating the weight gradient of a tile over all tokens at once. Tokens are processed in
blocks of ``token_block`` rows, so peak extra memory is about ``token_block x chunk_size`` floats (a
logits tile and its exp), independent of V*N.

Two backends: this module's torch loop (CPU, and fallback on CUDA) and the Triton kernels of
``triton_kernels`` (logit tiles stay in registers / shared memory, never in device memory).
``backend="auto"`` picks Triton for CUDA tensors when triton imports.

``with_stats`` adds per-token metrics without gradient: entropy, mean logit, log sum p^2 (WPO) and
``correct`` (the target is an argmax, ties included: its logit is >= the row max the online
logsumexp keeps anyway, so TRL's ``mean_token_accuracy`` needs no logits either).

Target ids must lie in [0, V): ``token_logps`` raises ValueError otherwise (an out-of-range id would
match no vocabulary column and silently give log p = -lse).

Optional gradient filtering (cut cross-entropy): with ``grad_filter_eps > 0`` the backward skips the
softmax part of a (token block, vocabulary tile) whose largest softmax probability is below eps; the
one-hot (target) part is always kept exactly. Off by default (exact gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_CHUNK = 8192
TOKEN_BLOCK = 4096
CCE_FILTER_EPS = 2.0 ** -12  # the threshold cut cross-entropy uses for gradient filtering
BACKENDS = ("auto", "torch", "triton")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _tile_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = h @ w.to(h.dtype).t()
    if b is not None:
        out.add_(b.to(h.dtype))
    return out


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of two [n, m] tensors without an [n, m] temporary."""
    return (a[:, None, :] @ b[:, :, None]).view(-1)


class _TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, with_stats: bool,
                token_block: int, grad_filter_eps: float):
        h = hidden.to(_acc_dtype(hidden))
        n, vocab = h.shape[0], weight.shape[0]
        f = dict(device=h.device, dtype=h.dtype)
        logp = torch.empty(n, **f)
        lse = torch.empty(n, **f)
        if with_stats:
            entropy, mean_logit, log_sum_p2, correct = (torch.empty(n, **f) for _ in range(4))
        # token block outer, vocabulary tile inner: at most a logits tile and its exp
        # (token_block x chunk_size each) are live, whatever N and V are.
        for t0 in range(0, n, token_block):
            t1 = min(t0 + token_block, n)
            hb, tb = h[t0:t1], targets[t0:t1]
            rows = torch.arange(t1 - t0, device=h.device)
            run_max = torch.full((t1 - t0,), float("-inf"), **f)
            run_sum = torch.zeros(t1 - t0, **f)  # sum exp(l - max)
            tgt = torch.zeros(t1 - t0, **f)
            if with_stats:
                plogit = torch.zeros(t1 - t0, **f)  # sum exp(l - max) * (l - max)
                lsum = torch.zeros(t1 - t0, **f)  # sum of logits (mean logit)
                sum2 = torch.zeros(t1 - t0, **f)  # sum exp(2 (l - max)) (log sum p^2)
            for v0 in range(0, vocab, chunk_size):
                v1 = min(v0 + chunk_size, vocab)
                logits = _tile_logits(hb, weight[v0:v1], None if bias is None else bias[v0:v1])
                inside = (tb >= v0) & (tb < v1)
                if inside.any():
                    idx = rows[inside]
                    tgt[idx] = logits[idx, tb[idx] - v0]
                if with_stats:
                    lsum += logits.sum(dim=1)
                new_max = torch.maximum(run_max, logits.max(dim=1).values)
                scale = torch.exp(run_max - new_max)
                shifted = logits.sub_(new_max[:, None])  # s = l - max, in place
                e = torch.exp(shifted)
                if with_stats:
                    # sum e*s relative to the new max: e -> e*scale, s -> s + (old max - new max)
                    delta = (run_max - new_max).nan_to_num(neginf=0.0)
                    plogit = (plogit + delta * run_sum) * scale + _rowdot(e, shifted)
                    sum2 = sum2 * scale * scale + _rowdot(e, e)
                run_sum = run_sum * scale + e.sum(dim=1)
                run_max = new_max
                del logits, shifted, e
            log_z = torch.log(run_sum)
            lse[t0:t1] = run_max + log_z
            logp[t0:t1] = tgt - lse[t0:t1]
            if with_stats:
                # -sum p log p with p = e / S, log p = s - log S
                entropy[t0:t1] = log_z - plogit / run_sum
                mean_logit[t0:t1] = lsum / vocab
                log_sum_p2[t0:t1] = torch.log(sum2) - 2 * log_z
                # tgt is an element of the same tiles run_max was taken over: exact comparison
                correct[t0:t1] = (tgt >= run_max).to(h.dtype)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.token_block, ctx.eps = chunk_size, token_block, grad_filter_eps
        if not with_stats:
            return logp, None, None, None, None
        ctx.mark_non_differentiable(entropy, mean_logit, log_sum_p2, correct)
        return logp, entropy, mean_logit, log_sum_p2, correct

    @staticmethod
    def backward(ctx, grad_logp, *_stat_grads):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, block, eps = ctx.chunk_size, ctx.token_block, ctx.eps
        h = hidden.to(_acc_dtype(hidden))
        g = grad_logp.to(h.dtype)
        n, vocab = h.shape[0], weight.shape[0]
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=h.dtype, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros(vocab, dtype=h.dtype, device=weight.device) \
            if bias is not None and ctx.needs_input_grad[2] else None
        for v0 in range(0, vocab, chunk):  # vocabulary tile outer: its weight grad is written once
            v1 = min(v0 + chunk, vocab)
            w = weight[v0:v1].to(h.dtype)
            gw = torch.zeros_like(w) if grad_w is not None else None
            for t0 in range(0, n, block):
                t1 = min(t0 + block, n)
                tt, gt = targets[t0:t1], g[t0:t1]
                r = torch.nonzero((tt >= v0) & (tt < v1)).squeeze(1)  # rows whose target is here
                # softmax tile, in place on the recomputed logits
                p = _tile_logits(h[t0:t1], w, None if bias is None else bias[v0:v1])
                p.sub_(lse[t0:t1, None]).exp_()
                if eps > 0 and p.max().item() < eps:
                    # gradient filtering: drop the (negligible) softmax part, keep the one-hot part
                    del p
                    if r.numel():
                        gr, cols = gt[r], tt[r] - v0
                        if grad_h is not None:
                            grad_h.index_add_(0, t0 + r, gr[:, None] * w[cols])
                        if gw is not None:
                            gw.index_add_(0, cols, gr[:, None] * h[t0 + r])
                        if grad_b is not None:
                            grad_b[v0:v1].index_add_(0, cols, gr)
                    continue
                # d logp / d logits = onehot(target) - softmax; scaled by the upstream grad
                dlogits = p.mul_(-gt[:, None])
                if r.numel():
                    dlogits[r, tt[r] - v0] += gt[r]
                if grad_h is not None:
                    grad_h[t0:t1] += dlogits @ w
                if gw is not None:
                    gw += dlogits.t() @ h[t0:t1]
                if grad_b is not None:
                    grad_b[v0:v1] += dlogits.sum(dim=0)
                del p, dlogits
            if grad_w is not None:
                grad_w[v0:v1] = gw
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype),
                None, None, None, None, None)


@dataclass
class HeadOutput:
    logps: torch.Tensor  # [N] log p(target), differentiable
    entropy: torch.Tensor | None = None  # [N] entropy of the next-token distribution (no grad)
    mean_logit: torch.Tensor | None = None  # [N] mean logit over the vocabulary (no grad)
    log_sum_p2: torch.Tensor | None = None  # [N] log sum_v p(v)^2 (no grad; WPO weighting)
    # [N] 1.0 where the target's logit is >= every logit (an argmax; ties count as correct, where
    # torch.argmax would pick the first tied id), else 0.0; no grad (TRL's mean_token_accuracy)
    correct: torch.Tensor | None = None


def triton_available() -> bool:
    """True when the Triton head imports (triton installed and usable)."""
    try:  # Triton is optional (CUDA only): imported on first use, never at start-up
        from dpo_engine.modeling.triton_kernels import triton_token_logps  # noqa: F401
    except Exception:  # ImportError, or triton failing to initialise
        return False
    return True


def _pick_backend(backend: str, hidden: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend != "auto":
        return backend
    if hidden.is_cuda and hidden.dtype != torch.float64 and triton_available():
        return "triton"
    return "torch"


def _check_targets(targets: torch.Tensor, vocab: int) -> None:
    """ValueError naming the first offending id when a target is outside [0, vocab). On CUDA this
    is one device-to-host sync (a min/max reduction, tens of microseconds); in sequence_logps the
    boolean-mask indexing just before has already synchronised, so the stream is idle then."""
    if targets.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(targets)).tolist()  # one transfer: one sync on CUDA
    if lo >= 0 and hi < vocab:
        return
    bad = targets[(targets < 0) | (targets >= vocab)][0].item()
    raise ValueError(f"target id {bad} is outside the vocabulary [0, V={vocab})")


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None, *, chunk_size: int = DEFAULT_CHUNK,
                with_stats: bool = False, token_block: int = TOKEN_BLOCK,
                grad_filter_eps: float = 0.0, backend: str = "auto") -> HeadOutput:
    """Per-token log-probs of ``targets`` under ``softmax(hidden @ weight.T + bias)``.

    hidden [N, d] (any float dtype; accumulation is fp32), weight [V, d], bias [V] or None,
    targets [N] int64. Differentiable in hidden, weight and bias. The torch path disables autocast
    and computes in fp32; the Triton path multiplies in the autocast dtype when autocast is on
    (bf16 tensor cores, fp32 accumulation, as TRL's head does) and in the input dtype otherwise.

    ``with_stats`` adds entropy, mean logit, log sum p^2 and ``correct`` per token (no grad);
    ``correct`` is 1.0 where the target's logit is >= the row max: the target is an argmax, and
    ties count as correct.
    Target ids outside [0, V) raise ValueError (one host sync on CUDA, see ``_check_targets``).
    ``grad_filter_eps`` > 0 enables gradient filtering in backward (``CCE_FILTER_EPS`` = 2^-12 is
    cut cross-entropy's value); 0 keeps gradients exact.
    ``backend``: "auto" (Triton for CUDA tensors when triton imports, else torch), "torch", or
    "triton" (on CPU tensors this only works under ``TRITON_INTERPRET=1``). ``chunk_size`` and
    ``token_block`` are the torch path's tiles; the Triton kernels use their own block sizes.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, d] and targets [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(targets.shape)}")
    if grad_filter_eps < 0:
        raise ValueError(f"grad_filter_eps must be >= 0; got {grad_filter_eps}")
    _check_targets(targets, weight.shape[0])
    if _pick_backend(backend, hidden) == "triton":  # optional dependency: see triton_available
        from dpo_engine.modeling.triton_kernels import triton_token_logps
        return HeadOutput(*triton_token_logps(hidden, weight, targets, bias, with_stats=with_stats,
                                              grad_filter_eps=grad_filter_eps))
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        out = _TokenLogps.apply(hidden, weight, bias, targets.long(), int(chunk_size),
                                bool(with_stats), int(token_block), float(grad_filter_eps))
    return HeadOutput(*out)


def naive_token_logps(hidden, weight, targets, bias=None) -> torch.Tensor:
    """Reference implementation (materialises [N, V]); for tests and benchmarks only."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
