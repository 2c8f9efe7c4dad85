"""Scale drill (RELIABILITY.md): does any cost grow faster than the work? Time and peak RSS at 10% and
at 100% of each job, side by side, so a per-row or per-step cost that grows shows as a ratio well
above 10x (time) or a peak that keeps climbing (memory).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/scale_drill.py [--rows 1000000] [--steps 20000]

1. validate: ROWS generated explicit string rows (JSONL) through ``validate_split``;
2. precompute: the reference log-probs of those rows with a tiny model (2 layers, width 32) through
   the shared cache (``cached_reference_logps``), ``--precompute-rows`` of them (default all);
3. train: STEPS optimizer steps of the tiny model on 64 pairs, a checkpoint every 50 steps (the
   newest 2 kept), as the train stage runs it.
Each job runs in a fresh process, once at 10% and once at 100% of its size; printed: seconds, rows or
steps per second, peak RSS (ru_maxrss of that process).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
WORDS = "the a of and to in is was it for on with as he at by had from they this story time once".split()


def _rows(path: Path, n: int) -> None:
    rnd = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(rnd.choice(WORDS) for _ in range(8)) + f" {i}?"
            f.write(json.dumps({"prompt": prompt, "chosen": f" yes {i}.", "rejected": f" no {i}."}) + "\n")


def _head(path: Path, n: int):
    """The first ``n`` rows of a validated split, the columns precompute reads (as the stage does: not
    the whole 1M-row file in memory, which would be the drill's own peak, not the job's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dpo_engine.stages.precompute import REFERENCE_COLUMNS

    f = pq.ParquetFile(path)
    cols = [c for c in REFERENCE_COLUMNS if c in f.schema_arrow.names]
    batches, got = [], 0
    for b in f.iter_batches(batch_size=min(n, 65536), columns=cols):
        batches.append(b)
        got += b.num_rows
        if got >= n:
            break
    return pa.Table.from_batches(batches).slice(0, n).to_pandas()


def job(kind: str, n: int, work: Path) -> dict:
    """One job in this process; returns its figures."""
    import torch

    from data_contracts.config import DataConfig, LossConfig, TrainConfig
    from dpo_engine.reference import cached_reference_logps, compute_reference_logps
    from dpo_engine.training import train
    from tiny import tiny_model_dir, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    # one intra-op thread: the tiny model's matrices are too small to share, and on a busy machine
    # OpenMP threads waiting for each other made each op ~100x slower (a figure of the load, not ours)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if kind == "validate":
        src = work / f"rows-{n}.jsonl"
        _rows(src, n)
        t0 = time.perf_counter()  # generation excluded
        from data_contracts.validation import validate_split
        rep = validate_split(str(src), work / f"valid-{n}", tiny_tokenizer(), DataConfig(max_length=64))
        assert rep["valid"] == n, rep
    elif kind == "precompute":
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(work / "m"), dtype=torch.float32)
        rows = _head(work / "valid-full" / "valid.parquet", n)
        t0 = time.perf_counter()
        _, stats = cached_reference_logps(work / "cache", f"k{n}", rows, {"split": "train"},
                                          lambda part: compute_reference_logps(model, part, pad_id=0, batch_size=256),
                                          log=lambda m: None)
        assert stats["computed_examples"] == n
    else:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(work / "m"), dtype=torch.float32)
        pairs = _head(work / "valid-full" / "valid.parquet", 64)
        ref = compute_reference_logps(model, pairs, pad_id=0, batch_size=64)
        cfg = TrainConfig(learning_rate=1e-4, max_steps=n, save_steps=50, save_total_limit=2,
                          per_device_train_batch_size=4, logging_steps=10, seed=0)
        t0 = time.perf_counter()
        train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=work / f"train-{n}")
    seconds = time.perf_counter() - t0
    return {"job": kind, "n": n, "seconds": round(seconds, 1), "per_second": round(n / seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--precompute-rows", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--job", nargs=3, help=argparse.SUPPRESS)  # kind n work: run one job here
    a = ap.parse_args()
    if a.job:
        print(json.dumps(job(a.job[0], int(a.job[1]), Path(a.job[2]))))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DPO_HOME": tempfile.mkdtemp(prefix="dpo-scale-home-")}
    with tempfile.TemporaryDirectory(prefix="dpo-scale-") as tmp:
        work = Path(tmp)
        pre = a.precompute_rows or a.rows
        plan = [("validate", a.rows // 10), ("validate", a.rows), ("precompute", pre // 10), ("precompute", pre),
                ("train", a.steps // 10), ("train", a.steps)]
        out = []
        for kind, n in plan:
            if kind == "precompute" and not (work / "valid-full").exists():
                (work / "valid-full").symlink_to(work / f"valid-{a.rows}")
            r = subprocess.run([sys.executable, __file__, "--job", kind, str(n), str(work)], env=env,
                               capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{kind} {n} failed:\n{r.stderr[-3000:]}")
            out.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(out[-1]), flush=True)
        print("\n| job | size | seconds | per second | peak RSS MB | time ratio 100%/10% |")
        print("|---|---|---|---|---|---|")
        for small, big in zip(out[::2], out[1::2]):
            for r in (small, big):
                ratio = f"{big['seconds'] / max(small['seconds'], 1e-9):.1f}x" if r is big else ""
                print(f"| {r['job']} | {r['n']:,} | {r['seconds']} | {r['per_second']} | {r['peak_rss_mb']} | {ratio} |")


if __name__ == "__main__":
    main()
