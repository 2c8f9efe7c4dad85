"""Fused completion log-prob head: per-token log p(target) without an [N, V] logits tensor.

``token_logps(hidden [N, d], weight [V, d], targets [N])`` walks the vocabulary in tiles of
``chunk_size`` columns with an online logsumexp (fp32 accumulators), and in backward recomputes each
tile, accumulating the weight gradient of a tile over all tokens at once. Peak extra memory is
``token_block x chunk_size`` floats, independent of V*N.

This is the torch path (CPU, and fallback on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_CHUNK = 8192
TOKEN_BLOCK = 4096


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _tile_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = h @ w.to(h.dtype).t()
    if b is not None:
        out = out + b.to(h.dtype)
    return out


class _TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, with_stats: bool):
        h = hidden.to(_acc_dtype(hidden))
        n, vocab = h.shape[0], weight.shape[0]
        f = dict(device=h.device, dtype=h.dtype)
        run_max = torch.full((n,), float("-inf"), **f)
        run_sum = torch.zeros(n, **f)
        tgt = torch.zeros(n, **f)
        plogit = torch.zeros(n, **f) if with_stats else None  # sum exp(l - max) * l
        lsum = torch.zeros(n, **f) if with_stats else None  # sum of logits (mean logit)
        rows = torch.arange(n, device=h.device)
        for v0 in range(0, vocab, chunk_size):
            v1 = min(v0 + chunk_size, vocab)
            logits = _tile_logits(h, weight[v0:v1], None if bias is None else bias[v0:v1])
            new_max = torch.maximum(run_max, logits.max(dim=1).values)
            scale = torch.exp(run_max - new_max)
            e = torch.exp(logits - new_max[:, None])
            run_sum = run_sum * scale + e.sum(dim=1)
            if with_stats:
                plogit = plogit * scale + (e * logits).sum(dim=1)
                lsum += logits.sum(dim=1)
            run_max = new_max
            inside = (targets >= v0) & (targets < v1)
            if inside.any():
                idx = rows[inside]
                tgt[idx] = logits[idx, targets[idx] - v0]
        lse = run_max + torch.log(run_sum)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        logp = tgt - lse
        if not with_stats:
            return logp, None, None
        entropy = lse - plogit / run_sum
        mean_logit = lsum / vocab
        ctx.mark_non_differentiable(entropy, mean_logit)
        return logp, entropy, mean_logit

    @staticmethod
    def backward(ctx, grad_logp, _g_entropy=None, _g_mean=None):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk_size
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
            for t0 in range(0, n, TOKEN_BLOCK):
                t1 = min(t0 + TOKEN_BLOCK, n)
                logits = _tile_logits(h[t0:t1], w, None if bias is None else bias[v0:v1])
                # d logp / d logits = onehot(target) - softmax; scaled by the upstream grad
                dlogits = torch.exp(logits - lse[t0:t1, None]).mul_(-g[t0:t1, None])
                tt = targets[t0:t1]
                inside = (tt >= v0) & (tt < v1)
                if inside.any():
                    r = torch.nonzero(inside).squeeze(1)
                    dlogits[r, tt[r] - v0] += g[t0:t1][r]
                if grad_h is not None:
                    grad_h[t0:t1] += dlogits @ w
                if gw is not None:
                    gw += dlogits.t() @ h[t0:t1]
                if grad_b is not None:
                    grad_b[v0:v1] += dlogits.sum(dim=0)
            if grad_w is not None:
                grad_w[v0:v1] = gw
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype),
                None, None, None)


@dataclass
class HeadOutput:
    logps: torch.Tensor  # [N] log p(target), differentiable
    entropy: torch.Tensor | None = None  # [N] entropy of the next-token distribution (no grad)
    mean_logit: torch.Tensor | None = None  # [N] mean logit over the vocabulary (no grad)


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None, *, chunk_size: int = DEFAULT_CHUNK,
                with_stats: bool = False) -> HeadOutput:
    """Per-token log-probs of ``targets`` under ``softmax(hidden @ weight.T + bias)``.

    hidden [N, d] (any float dtype; accumulation is fp32), weight [V, d], bias [V] or None,
    targets [N] int64. Differentiable in hidden, weight and bias. Autocast is disabled inside:
    the head always computes in fp32.
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, d] and targets [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(targets.shape)}")
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logp, ent, mean = _TokenLogps.apply(hidden, weight, bias, targets.long(), int(chunk_size),
                                            bool(with_stats))
    return HeadOutput(logp, ent, mean)


def naive_token_logps(hidden, weight, targets, bias=None) -> torch.Tensor:
    """Reference implementation (materialises [N, V]); for tests and benchmarks only."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
