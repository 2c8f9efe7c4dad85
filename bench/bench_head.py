"""Fused log-prob head: forward+backward time and peak extra memory, side by side in one run.

Variants, each in its own subprocess (so peak memory is its own): ``naive`` (logits + log_softmax +
gather), ``ours`` (dpo_engine.modeling.token_logps, backend auto: the chunked torch path on CPU,
Triton forward + gemm backward on CUDA), on CUDA also ``ours_torch`` (the torch path) and
``ours_fused`` (Triton, fused backward kernels), ``trl`` (TRL's ChunkedLogProbFunction with its DPO
vocabulary chunk of 32,768, when trl is installed) and ``liger`` (Liger's fused linear
cross-entropy with reduction="none", when installed). Peak extra memory is max allocated (CUDA) or
max RSS (CPU) above what the inputs take; it includes the gradients of h and W, which every variant
returns.

    python bench/bench_head.py [--n 4096] [--d 576] [--v 49152] [--dtype float32] [--repeats 3]
    python bench/bench_head.py --qwen3   # the GPU target shape: N 16,384, d 1,024, V 151,936, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

VARIANTS = ("naive", "ours", "ours_torch", "ours_fused", "trl", "liger")
CUDA_ONLY = ("ours_torch", "ours_fused")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(name: str, n: int, d: int, v: int, dtype: str, repeats: int, chunk: int,
                trl_chunk: int, blocks: dict | None) -> dict:
    import torch

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = getattr(torch, dtype)
    h = torch.randn(n, d, device=dev, dtype=dt, requires_grad=True)
    w = (torch.randn(v, d, device=dev, dtype=dt) * 0.02).requires_grad_()
    t = torch.randint(0, v, (n,), device=dev)
    if name == "naive":
        def fn():
            return torch.log_softmax((h @ w.t()).float(), -1).gather(1, t[:, None]).squeeze(1)
    elif name in ("ours", "ours_torch"):
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from dpo_engine.modeling import token_logps

        backend = "torch" if name == "ours_torch" else "auto"

        def fn():
            if backend == "auto" and dev == "cuda":
                from dpo_engine.modeling.triton_kernels import triton_token_logps
                return triton_token_logps(h, w, t, blocks=blocks)[0]
            return token_logps(h, w, t, chunk_size=chunk, backend=backend).logps
    elif name == "ours_fused":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from dpo_engine.modeling.triton_kernels import triton_token_logps

        def fn():
            return triton_token_logps(h, w, t, blocks=blocks, bwd="fused")[0]
    elif name == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        def fn():
            return ChunkedLogProbFunction.apply(h, w, None, t, 1.0, trl_chunk, None, 1.0, ())[0]
    elif name == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def fn():
            return -liger_fused_linear_cross_entropy(h, w, t, reduction="none")
    else:
        raise SystemExit(f"unknown variant {name}")

    def step():
        out = fn()
        out.sum().backward()
        h.grad = w.grad = None

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    step()  # warm-up (and the peak)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if dev == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    flops = 6 * n * d * v
    best = min(times)
    return {"variant": name, "device": dev, "seconds": best, "tflops": flops / best / 1e12,
            "peak_extra_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="completion tokens")
    ap.add_argument("--d", type=int, default=576, help="hidden size")
    ap.add_argument("--v", type=int, default=49152, help="vocabulary size")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--chunk", type=int, default=8192, help="vocabulary tile")
    ap.add_argument("--trl-chunk", type=int, default=32768, help="TRL's vocabulary chunk (its DPO default)")
    ap.add_argument("--blocks", default="", help='Triton block overrides as JSON, e.g. {"BLOCK_N": 128}')
    ap.add_argument("--qwen3", action="store_true", help="N 16384, d 1024, V 151936, bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.qwen3:
        args.n, args.d, args.v, args.dtype = 16384, 1024, 151936, "bfloat16"
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.n, args.d, args.v, args.dtype, args.repeats, args.chunk,
                                     args.trl_chunk, json.loads(args.blocks) if args.blocks else None)))
        return
    import torch

    print(f"fused log-prob head, N={args.n} d={args.d} V={args.v} {args.dtype}, fwd+bwd, "
          f"best of {args.repeats}; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
          f"TFLOP/s counted as 6*N*d*V")
    print(f"naive logits alone would be {args.n * args.v * 4 / 2**20:.0f} MB in fp32")
    print(f"{'variant':<11}{'seconds':>10}{'TFLOP/s':>10}{'peak extra MB':>16}{'time vs ours':>14}")
    rows = {}
    for name in VARIANTS:
        if name in CUDA_ONLY and not torch.cuda.is_available():
            continue
        cmd = [sys.executable, __file__, "--variant", name, f"--blocks={args.blocks}",
               f"--trl-chunk={args.trl_chunk}"] + [f"--{k}={getattr(args, k)}" for k in
                                                   ("n", "d", "v", "dtype", "chunk", "repeats")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            last = (out.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{name:<11}  skipped: {last[:100]}")
            continue
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    for name, r in rows.items():
        rel = r["seconds"] / rows["ours"]["seconds"] if "ours" in rows else float("nan")
        print(f"{name:<11}{r['seconds']:>10.4f}{r['tflops']:>10.1f}{r['peak_extra_mb']:>16.0f}{rel:>14.2f}")


if __name__ == "__main__":
    main()
