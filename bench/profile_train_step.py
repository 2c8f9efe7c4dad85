"""Where a GPU training step of our trainer spends its time: torch.profiler over a few steps.

Same model and data as ``bench_trainer.py --gpu``; prints wall time per step and the top operators
by CUDA time and by CPU time, so launch overhead and slow kernels show up.

    python bench/profile_train_step.py [--steps 3] [--packed] [--bf16-weights]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import pandas as pd
    import torch
    from torch.profiler import ProfilerActivity, profile

    import bench_trainer as bt
    from data_contracts.config import LossConfig, TrainConfig
    from dpo_engine.reference import compute_reference_logps
    from dpo_engine.training import train

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs-per-step", type=int, default=8)
    ap.add_argument("--packed", action="store_true")
    ap.add_argument("--bf16-weights", action="store_true", help="bf16 weights, fp32 master copies")
    args = ap.parse_args()
    tok = bt.load_tokenizer()
    rows = bt.text_rows((args.steps + 2) * args.pairs_per_step, tok, 1024)
    pairs = pd.DataFrame([{"example_id": f"ex{i}", **bt.tokenize_like_trl(r, tok, 1024)} for i, r in enumerate(rows)])
    model = bt.make_model(len(tok), gpu=True)
    if args.bf16_weights:
        model = model.to(torch.bfloat16)
    ref = compute_reference_logps(model, pairs, pad_id=tok.pad_token_id, batch_size=args.pairs_per_step, device="cuda")
    stamps = []

    def run(steps: int) -> None:
        cfg = TrainConfig(per_device_train_batch_size=args.pairs_per_step, max_steps=steps, learning_rate=1e-6,
                          logging_steps=1, seed=0, padding_free=args.packed, save_steps=10**6)
        with tempfile.TemporaryDirectory() as out:
            train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=tok.pad_token_id, out_dir=Path(out),
                  device="cuda", log_fn=lambda m, s: stamps.append(time.perf_counter()))

    run(2)
    stamps.clear()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        run(args.steps)
    print("step wall s:", [round(b - a, 3) for a, b in zip([t0] + stamps[:-1], stamps)])
    ka = prof.key_averages()
    print(ka.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
