"""Block-size sweep of the Triton head on a CUDA device: forward alone and forward+backward.

Prints, per configuration, the forward time, the fwd+bwd time, TFLOP/s counted as 6*N*d*V (the
figure the GPU target is stated in) and the peak extra memory, so ``DEFAULT_BLOCKS`` in
``dpo_engine/modeling/triton_kernels.py`` can be set from measurements on the target GPU.

    python bench/tune_triton_head.py [--n 16384] [--d 1024] [--v 151936]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages)
CONFIGS = [
    (64, 128, 64, 4, 3), (128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4), (64, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 2),
    (128, 64, 64, 4, 4),
]


def main() -> None:
    import triton.testing

    from dpo_engine.modeling.triton_kernels import triton_token_logps

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--chunks", default="4096,8192,16384", help="CHUNK_V values for the best config")
    args = ap.parse_args()
    torch.manual_seed(0)
    n, d, v = args.n, args.d, args.v
    h = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    flops = 6 * n * d * v
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"N={n} d={d} V={v} bf16")

    def measure(blocks):
        def fwd():
            with torch.no_grad():
                triton_token_logps(h, w, t, blocks=blocks)

        def step():
            triton_token_logps(h, w, t, blocks=blocks)[0].sum().backward()
            h.grad = w.grad = None

        f_ms = triton.testing.do_bench(fwd, warmup=5, rep=40)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        s_ms = triton.testing.do_bench(step, warmup=3, rep=60)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return f_ms, s_ms, peak

    best = None
    print(f"{'BN,BV,BD,warps,stages':<24}{'fwd ms':>9}{'fwd TF/s':>10}{'step ms':>9}{'TF/s (6NdV)':>13}"
          f"{'peak MB':>9}")
    for bn, bv, bd, nw, ns in CONFIGS:
        blocks = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=bd, num_warps=nw, num_stages=ns)
        try:
            f_ms, s_ms, peak = measure(blocks)
        except Exception as e:  # out of shared memory / registers for this config
            print(f"{str((bn, bv, bd, nw, ns)):<24}  failed: {type(e).__name__}: {str(e)[:80]}")
            continue
        print(f"{str((bn, bv, bd, nw, ns)):<24}{f_ms:9.2f}{2 * n * d * v / f_ms / 1e9:10.0f}{s_ms:9.2f}"
              f"{flops / s_ms / 1e9:13.0f}{peak:9.0f}")
        if best is None or s_ms < best[0]:
            best = (s_ms, blocks)
    print("best:", json.dumps(best[1]))
    for c in [int(x) for x in args.chunks.split(",") if x]:
        blocks = dict(best[1], CHUNK_V=c)
        f_ms, s_ms, peak = measure(blocks)
        print(f"CHUNK_V={c:<14}{f_ms:9.2f}{'':10}{s_ms:9.2f}{flops / s_ms / 1e9:13.0f}{peak:9.0f}")


if __name__ == "__main__":
    main()
