"""Triton kernels for the fused completion log-prob head (cut cross-entropy style).

Forward: one program per block of ``BLOCK_N`` tokens walks the vocabulary in tiles of ``BLOCK_V``
columns; each logits tile ``h_block @ W_tile^T (+ b_tile)`` is built with ``tl.dot`` over
``BLOCK_D``-wide slices of the hidden size and lives only in registers / shared memory. An online
max / sum-exp folds it into the per-token logsumexp; the target logit is picked from the tile; the
optional stats (entropy, mean logit, log sum p^2) are folded the same way, and ``correct`` (target
logit >= the final online max: the target is an argmax) costs one compare per token. Only per-token
vectors are written to device memory, nothing of size N x V.

Backward recomputes the logit tiles from the saved per-token lse:
``dlogits = g * (onehot(target) - softmax)``. Two backward modes:

* ``"gemm"`` (default): the vocabulary is walked in chunks of ``Vc`` columns (``Vc`` chosen so one
  ``N x Vc`` chunk of dlogits fits ``GEMM_BWD_BYTES``); ``_dl_chunk_kernel`` recomputes the logit
  tiles on chip and writes only dlogits of that chunk (in the input dtype), then two cuBLAS GEMMs
  give ``grad_W[chunk] = dlogits^T @ h`` (the whole chunk's weight gradient over all tokens, written
  once) and ``grad_h += dlogits @ W[chunk]`` (fp32 accumulator). Tensor-core GEMMs do the 4·N·d·V
  backward FLOPs; memory stays bounded by the chunk, whatever N and V are.
* ``"fused"`` (used for gradient filtering, which needs per-tile skips):
* ``_bwd_dh_kernel``: one program per token block, looping over vocabulary tiles, accumulates
  ``grad_h[block] += dlogits @ W_tile``.
* ``_bwd_dw_kernel``: one program per vocabulary tile, looping over token blocks, accumulates
  ``grad_W[tile] += dlogits^T @ h_block`` and ``grad_b[tile] += sum(dlogits)``.

Each program owns its output rows, so there are no atomics and results are deterministic. When the
hidden size fits one ``BLOCK_D`` slice the gradient accumulator stays in registers and is written
once; otherwise the program read-modify-writes its own fp32 rows (``BLOCK_N x d`` or
``BLOCK_V x d``, small enough to stay in L2) once per tile it does not skip.

Gradient filtering (``grad_filter_eps > 0``): a (token block, vocabulary tile) whose largest softmax
probability is below eps and that holds no target of the block is skipped in both backward kernels
(its gradient is below eps * |g| per entry). Tiles holding a target are always computed exactly.

The token count (and the chunk offsets) are not specialised on (``do_not_specialize``): every
batch has another N, and a recompilation per divisibility class cost seconds per training step.

Accumulation is fp32 for every input dtype (fp32 / fp16 / bf16). fp32 dots use
``input_precision="ieee"`` (no TF32), so fp32 results match a float64 reference to ~1e-6.

Under ``TRITON_INTERPRET=1`` (CPU tensors) the interpreter has no bfloat16 ``tl.dot`` (it multiplies
the raw uint16 bit patterns, triton-lang/triton#11584), so dot operands are upcast to fp32 there.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

DEFAULT_BLOCKS = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=4, num_stages=3)
# Hopper (sm_90): measured best of a sweep on an H100 (bench/tune_triton_head.py, BENCHMARKS.md);
# its 4-stage pipeline needs ~196 KB of shared memory, more than pre-Hopper GPUs have.
HOPPER_BLOCKS = dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=4)
GEMM_BWD_BYTES = 128 * 2**20  # dlogits chunk budget of the "gemm" backward
BWD_MODES = ("auto", "gemm", "fused")
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, D,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of h[rows] @ W[cols]^T (+ b[cols]); rows/cols are int64."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        kmask = ks < D
        a = tl.load(h_ptr + rows[:, None] * D + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None] * D + ks[None, :],
                    mask=cmask[:, None] & kmask[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit(do_not_specialize=["N"])
def _fwd_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, logp_ptr, ent_ptr, mean_ptr, p2_ptr, hit_ptr,
                N, V, D,
                HAS_BIAS: tl.constexpr, WITH_STATS: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
                PREC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(l - m)
    tgt_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if WITH_STATS:
        pl = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(l - m) * l
        lsum = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum l
        s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(2 (l - m))
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cmask = cols < V
        logits = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, D, HAS_BIAS,
                              BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32, PREC)
        logits = tl.where(cmask[None, :], logits, float("-inf"))
        new_m = tl.maximum(m, tl.max(logits, axis=1))
        scale = tl.exp(m - new_m)
        e = tl.exp(logits - new_m[:, None])
        s = s * scale + tl.sum(e, axis=1)
        tgt_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), axis=1)
        if WITH_STATS:
            lv = tl.where(cmask[None, :], logits, 0.0)
            pl = pl * scale + tl.sum(e * lv, axis=1)
            lsum += tl.sum(lv, axis=1)
            s2 = s2 * scale * scale + tl.sum(e * e, axis=1)
        m = new_m
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(logp_ptr + rows, tgt_logit - lse, mask=rmask)
    if WITH_STATS:
        # entropy = lse - sum p * l
        tl.store(ent_ptr + rows, lse - pl / s, mask=rmask)
        tl.store(mean_ptr + rows, lsum / V, mask=rmask)
        tl.store(p2_ptr + rows, tl.log(s2) - 2.0 * log_s, mask=rmask)
        # tgt_logit is the tile's own value (plus zeros), so >= m is exact: an argmax, ties included
        tl.store(hit_ptr + rows, (tgt_logit >= m).to(tl.float32), mask=rmask)


@triton.jit
def _dlogits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, lse, g, tgt, D, eps,
                  HAS_BIAS: tl.constexpr, FILTER: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
                  PREC: tl.constexpr):
    """(dlogits fp32 tile, keep flag): g * (onehot - softmax), and whether the tile is needed."""
    logits = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, D, HAS_BIAS,
                          BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32, PREC)
    valid = rmask[:, None] & cmask[None, :]
    p = tl.where(valid, tl.exp(logits - lse[:, None]), 0.0)
    onehot = (cols[None, :] == tgt[:, None]) & valid
    dl = g[:, None] * (onehot.to(tl.float32) - p)
    if FILTER:
        keep = (tl.max(tl.max(p, axis=1), axis=0) >= eps) | \
            (tl.max(tl.max(onehot.to(tl.int32), axis=1), axis=0) > 0)
    else:
        keep = True
    return dl, keep


@triton.jit(do_not_specialize=["N", "v0", "VC"])
def _dl_chunk_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dl_ptr, N, V, D, v0, VC, stride_dl,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """dlogits of columns [v0, v0 + VC) for one (token block, vocabulary tile), stored to dl."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    local = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v0 + local
    cmask = (local < VC) & (cols < V)
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    dl, keep = _dlogits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, lse, g, tgt, D, 0.0,
                             HAS_BIAS, False, BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32, PREC)
    tl.store(dl_ptr + rows[:, None] * stride_dl + local[None, :],
             dl.to(dl_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit(do_not_specialize=["N"])
def _bwd_dh_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, gh_ptr, N, V, D, eps,
                   HAS_BIAS: tl.constexpr, FILTER: tl.constexpr, SINGLE_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_F32: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    if SINGLE_D:
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cmask = cols < V
        dl, keep = _dlogits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, lse, g, tgt, D,
                                 eps, HAS_BIAS, FILTER, BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32, PREC)
        if keep:
            for k0 in range(0, D, BLOCK_D):
                ks = k0 + tl.arange(0, BLOCK_D)
                kmask = ks < D
                w = tl.load(w_ptr + cols[:, None] * D + ks[None, :],
                            mask=cmask[:, None] & kmask[None, :], other=0.0)
                if DOT_F32:
                    upd = tl.dot(dl, w.to(tl.float32), input_precision=PREC, out_dtype=tl.float32)
                else:
                    upd = tl.dot(dl.to(w.dtype), w, out_dtype=tl.float32)
                if SINGLE_D:
                    acc += upd
                else:
                    ptrs = gh_ptr + rows[:, None] * D + ks[None, :]
                    omask = rmask[:, None] & kmask[None, :]
                    tl.store(ptrs, tl.load(ptrs, mask=omask, other=0.0) + upd, mask=omask)
    if SINGLE_D:
        ks = tl.arange(0, BLOCK_D)
        tl.store(gh_ptr + rows[:, None] * D + ks[None, :], acc,
                 mask=rmask[:, None] & (ks < D)[None, :])


@triton.jit(do_not_specialize=["N"])
def _bwd_dw_kernel(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, gw_ptr, gb_ptr, N, V, D, eps,
                   HAS_BIAS: tl.constexpr, GRAD_B: tl.constexpr, FILTER: tl.constexpr,
                   SINGLE_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < V
    if GRAD_B:
        acc_b = tl.zeros((BLOCK_V,), dtype=tl.float32)
    if SINGLE_D:
        acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, N, BLOCK_N):
        rows = t0 + tl.arange(0, BLOCK_N).to(tl.int64)
        rmask = rows < N
        tgt = tl.load(t_ptr + rows, mask=rmask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
        dl, keep = _dlogits_tile(h_ptr, w_ptr, b_ptr, rows, cols, rmask, cmask, lse, g, tgt, D,
                                 eps, HAS_BIAS, FILTER, BLOCK_N, BLOCK_V, BLOCK_D, DOT_F32, PREC)
        if keep:
            if GRAD_B:
                acc_b += tl.sum(dl, axis=0)
            for k0 in range(0, D, BLOCK_D):
                ks = k0 + tl.arange(0, BLOCK_D)
                kmask = ks < D
                h = tl.load(h_ptr + rows[:, None] * D + ks[None, :],
                            mask=rmask[:, None] & kmask[None, :], other=0.0)
                if DOT_F32:
                    upd = tl.dot(tl.trans(dl), h.to(tl.float32), input_precision=PREC,
                                 out_dtype=tl.float32)
                else:
                    upd = tl.dot(tl.trans(dl.to(h.dtype)), h, out_dtype=tl.float32)
                if SINGLE_D:
                    acc += upd
                else:
                    ptrs = gw_ptr + cols[:, None] * D + ks[None, :]
                    omask = cmask[:, None] & kmask[None, :]
                    tl.store(ptrs, tl.load(ptrs, mask=omask, other=0.0) + upd, mask=omask)
    if SINGLE_D:
        ks = tl.arange(0, BLOCK_D)
        tl.store(gw_ptr + cols[:, None] * D + ks[None, :], acc,
                 mask=cmask[:, None] & (ks < D)[None, :])
    if GRAD_B:
        tl.store(gb_ptr + cols, acc_b, mask=cmask)


def _config(hidden: torch.Tensor, blocks: dict | None) -> dict:
    # HOPPER_BLOCKS for 16-bit inputs on a GPU with Hopper-sized shared memory (fp32 tiles need twice it)
    smem = getattr(torch.cuda.get_device_properties(hidden.device), "shared_memory_per_block_optin", 0) \
        if hidden.is_cuda else 0
    big = hidden.dtype != torch.float32 and smem >= 200 * 1024
    cfg = dict(HOPPER_BLOCKS if big else DEFAULT_BLOCKS, **(blocks or {}))
    for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D"):
        v = cfg[k]
        if v < 16 or v & (v - 1):
            raise ValueError(f"{k} must be a power of two >= 16 (tl.dot); got {v}")
    interp = _interpreting()
    cfg["DOT_F32"] = interp or hidden.dtype == torch.float32
    cfg["PREC"] = "ieee" if cfg["DOT_F32"] else None  # fp32 dots without TF32
    return cfg


def _launch(cfg: dict) -> dict:
    """Compile-time and launch options shared by every kernel."""
    return {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D", "DOT_F32", "PREC", "num_warps",
                                "num_stages")}


def _acc_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with fp32 accumulation for any input dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):  # older torch: no out_dtype
            pass
    acc.addmm_(a.float(), b.float())


class TritonTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, with_stats: bool, grad_filter_eps: float,
                blocks: dict | None, bwd: str):
        if hidden.dtype not in _SUPPORTED or weight.dtype not in _SUPPORTED:
            raise TypeError(f"the Triton head supports {_SUPPORTED}; got {hidden.dtype}, "
                            f"{weight.dtype} (use backend='torch')")
        weight_dtype = weight.dtype
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
        hidden, weight = hidden.contiguous(), weight.contiguous()
        targets = targets.long().contiguous()
        bias_c = None if bias is None else bias.contiguous()
        n, d = hidden.shape
        vocab = weight.shape[0]
        if weight.shape[1] != d or (bias is not None and bias.shape != (vocab,)):
            b_shape = None if bias is None else tuple(bias.shape)
            raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight "
                             f"{tuple(weight.shape)}, bias {b_shape}")
        cfg = _config(hidden, blocks)
        f = dict(device=hidden.device, dtype=torch.float32)
        lse, logp = torch.empty(n, **f), torch.empty(n, **f)
        stats = [torch.empty(n, **f) for _ in range(4)] if with_stats else [lse] * 4
        if n:
            _fwd_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
                hidden, weight, hidden if bias_c is None else bias_c, targets, lse, logp, *stats,
                n, vocab, d, HAS_BIAS=bias is not None, WITH_STATS=with_stats, **_launch(cfg))
        ctx.save_for_backward(hidden, weight, bias_c, targets, lse)
        ctx.cfg, ctx.eps = cfg, float(grad_filter_eps)
        ctx.bwd = ("fused" if grad_filter_eps > 0 else "gemm") if bwd == "auto" else bwd
        ctx.weight_dtype = weight_dtype
        if not with_stats:
            return logp, None, None, None, None
        ctx.mark_non_differentiable(*stats)
        return (logp, *stats)

    @staticmethod
    def backward(ctx, grad_logp, *_stat_grads):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        g = grad_logp.to(torch.float32).contiguous()
        run = _backward_gemm if ctx.bwd == "gemm" else _backward_fused
        grad_h, grad_w, grad_b = run(ctx.cfg, ctx.eps, hidden, weight, bias, targets, lse, g,
                                     need_h, need_w, need_b)
        if grad_h is not None:
            grad_h = grad_h.to(hidden.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _backward_gemm(cfg, eps, hidden, weight, bias, targets, lse, g, need_h, need_w, need_b):
    """dlogits chunk by chunk (on-chip recompute), then tensor-core GEMMs (module docstring)."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    f = dict(device=hidden.device, dtype=torch.float32)
    grad_h = torch.zeros((n, d), **f) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty(vocab, **f) if need_b else None
    if not n:
        if grad_w is not None:
            grad_w.zero_()
        if grad_b is not None:
            grad_b.zero_()
        return grad_h, grad_w, grad_b
    bv = cfg["BLOCK_V"]
    vc = cfg.get("CHUNK_V") or GEMM_BWD_BYTES // (n * hidden.element_size())
    vc = max(bv, min(vc // bv * bv, triton.cdiv(vocab, bv) * bv))
    buf = torch.empty((n, vc), device=hidden.device, dtype=hidden.dtype)
    b_arg = hidden if bias is None else bias
    for v0 in range(0, vocab, vc):
        width = min(vc, vocab - v0)
        _dl_chunk_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(width, bv))](
            hidden, weight, b_arg, targets, lse, g, buf, n, vocab, d, v0, width, buf.stride(0),
            HAS_BIAS=bias is not None, **_launch(cfg))
        dl = buf[:, :width]
        if grad_w is not None:
            torch.mm(dl.t(), hidden, out=grad_w[v0:v0 + width])
        if grad_h is not None:
            _acc_mm(grad_h, dl, weight[v0:v0 + width])
        if grad_b is not None:
            grad_b[v0:v0 + width] = dl.sum(dim=0, dtype=torch.float32)
    return grad_h, grad_w, grad_b


def _backward_fused(cfg, eps, hidden, weight, bias, targets, lse, g, need_h, need_w, need_b):
    """Both gradients from recomputed tiles inside two kernels; supports gradient filtering."""
    n, d = hidden.shape
    vocab = weight.shape[0]
    f = dict(device=hidden.device, dtype=torch.float32)
    single_d = d <= cfg["BLOCK_D"]
    common = dict(HAS_BIAS=bias is not None, FILTER=eps > 0, SINGLE_D=single_d, **_launch(cfg))
    b_arg = hidden if bias is None else bias
    grad_h = grad_w = grad_b = None
    if need_h:
        grad_h = (torch.empty if single_d else torch.zeros)((n, d), **f)
        if n:
            _bwd_dh_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
                hidden, weight, b_arg, targets, lse, g, grad_h, n, vocab, d, eps, **common)
    if need_w or need_b:
        gw = (torch.empty if single_d and n else torch.zeros)((vocab, d), **f)
        gb = torch.zeros(vocab, **f) if need_b else gw
        if n:
            _bwd_dw_kernel[(triton.cdiv(vocab, cfg["BLOCK_V"]),)](
                hidden, weight, b_arg, targets, lse, g, gw, gb, n, vocab, d, eps,
                GRAD_B=need_b, **common)
        grad_w = gw if need_w else None
        grad_b = gb if need_b else None
    return grad_h, grad_w, grad_b


def triton_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       bias: torch.Tensor | None = None, *, with_stats: bool = False,
                       grad_filter_eps: float = 0.0, blocks: dict | None = None,
                       bwd: str = "auto"):
    """(logps, entropy, mean_logit, log_sum_p2, correct) [N] fp32 from the Triton kernels; the
    stats are None unless ``with_stats`` (``correct``: 1.0 where the target is an argmax, ties
    included; see ``fused_head.HeadOutput``). ``blocks`` overrides BLOCK_N / BLOCK_V / BLOCK_D /
    num_warps / num_stages (and CHUNK_V, the gemm backward's chunk width). ``bwd``: "auto" (gemm, or fused
    when gradient filtering is on), "gemm" or "fused" (module docstring)."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, d] and targets [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(targets.shape)}")
    if bwd not in BWD_MODES:
        raise ValueError(f"bwd must be one of {BWD_MODES}; got {bwd!r}")
    if bwd == "gemm" and grad_filter_eps > 0:
        raise ValueError("gradient filtering needs bwd='fused' (the gemm backward has no tile skips)")
    if not hidden.is_cuda and not _interpreting():
        raise RuntimeError("the Triton head needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "triton is imported (CPU, for tests)")
    if torch.is_autocast_enabled(hidden.device.type):
        # the head's matmuls run in the autocast dtype (fp32 accumulation), as every other matmul
        # of the model does; the casts are differentiable, so the gradients keep the input dtypes
        dt = torch.get_autocast_dtype(hidden.device.type)
        if dt in _SUPPORTED:
            hidden = hidden.to(dt)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return TritonTokenLogps.apply(hidden, weight, bias, targets, bool(with_stats),
                                      float(grad_filter_eps), blocks, bwd)
