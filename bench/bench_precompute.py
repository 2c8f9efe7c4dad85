"""Reference precompute throughput: our pass vs the naive one, side by side in one run.

Both compute the summed completion log-probs of every chosen and rejected sequence of the same
tokenized rows with the same model, in inference mode, ``--batch-size`` sequences per forward pass:

- ``ours``: ``dpo_engine.reference.compute_reference_logps``, what the precompute stage runs:
  sequences sorted by length (little padding), no attention mask under right padding, the fused
  log-prob head on completion positions only (no [tokens, vocabulary] logits), the autocast of
  ``--precision`` resolved on the device (bf16 on CUDA under "auto", none on the CPU);
- ``naive``: pairs in data order (chosen and rejected side by side), right-padded, the model's full
  logits at every position, ``log_softmax`` in fp32, ``gather`` of the next tokens, masked sum; same
  autocast.

The rows are the UltraFeedback sample in ../shared/data tokenized as the validate stage does
(``data_contracts.validation.validate_split``: explicit prompt, EOS appended, keep_start truncation to
``--max-length``, ``--rows`` valid rows picked by the seeded hash), the model the real tiny
stories260K (../shared/models). Throughput counts real (non-padding) tokens: prompt + completion of
every sequence. Each side runs once on a few rows first (warm-up), then ``--repeats`` times over all
rows, the two sides alternating (a load change on a shared machine hits both); the best time of each
is reported, and all times are printed.

    python bench/bench_precompute.py [--rows 256] [--batch-size 32] [--max-length 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("DPO_SHARED", ROOT.parent / "shared"))
MODEL = SHARED / "models" / "stories260K"
DATA = SHARED / "data" / "ultrafeedback-binarized-sample" / "train_clean.jsonl"


def tokenized_rows(tok, rows: int, max_length: int, data: Path):
    """``rows`` valid rows of ``data`` as the validate stage writes them to valid.parquet."""
    from data_contracts.config import DataConfig
    from data_contracts.validation import validate_split
    from data_contracts.validation import read_valid

    cfg = DataConfig(max_length=max_length, max_invalid_fraction=1.0, train_limit=rows)
    with tempfile.TemporaryDirectory(prefix="bench-precompute-") as d:
        validate_split(data, Path(d), tok, cfg, split="train", num_proc=1)
        return read_valid(Path(d) / "valid.parquet")


def naive_reference_logps(model, rows, *, pad_id: int, batch_size: int, device, precision: str):
    """Pairs in data order, padded, full logits + log_softmax + gather: the textbook way."""
    import numpy as np
    import torch

    from dpo_engine.modeling import autocast, autocast_dtype

    amp = autocast_dtype(precision, device)
    seqs = []
    for r in rows.itertuples(index=False):
        seqs.append((list(r.prompt_input_ids), list(r.chosen_input_ids)))
        seqs.append((list(r.prompt_input_ids), list(r.rejected_input_ids)))
    out, padded = [], 0
    with torch.inference_mode():
        for b0 in range(0, len(seqs), batch_size):
            chunk = seqs[b0:b0 + batch_size]
            t = max(len(p) + len(c) for p, c in chunk)
            ids = torch.full((len(chunk), t), pad_id, dtype=torch.long)
            att = torch.zeros((len(chunk), t), dtype=torch.long)
            comp = torch.zeros((len(chunk), t), dtype=torch.bool)  # positions predicting a completion token
            for i, (p, c) in enumerate(chunk):
                ids[i, :len(p) + len(c)] = torch.tensor(p + c)
                att[i, :len(p) + len(c)] = 1
                comp[i, len(p) - 1:len(p) + len(c) - 1] = True
            padded += ids.numel()
            ids, att, comp = ids.to(device), att.to(device), comp.to(device)
            with autocast(amp, device):
                logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], pad_id)], dim=1)
            tok_logp = logp.gather(2, targets[..., None]).squeeze(2)
            out.append((tok_logp * comp).sum(1).double().cpu())
    logps = torch.cat(out).numpy()
    return np.stack([logps[0::2], logps[1::2]], axis=1), padded


def sorted_padded_tokens(rows, batch_size: int) -> int:
    """Token slots (real + padding) our length-sorted batches hold."""
    lengths = sorted([len(r.prompt_input_ids) + len(r.chosen_input_ids) for r in rows.itertuples()]
                     + [len(r.prompt_input_ids) + len(r.rejected_input_ids) for r in rows.itertuples()])
    return sum(max(lengths[b:b + batch_size]) * len(lengths[b:b + batch_size])
               for b in range(0, len(lengths), batch_size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256, help="preference pairs (2 sequences each)")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (reference.batch_size)")
    ap.add_argument("--max-length", type=int, default=512, help="data.max_length (stories260K has 512 positions)")
    ap.add_argument("--chunk-size", type=int, default=8192, help="vocabulary tile of the fused head")
    ap.add_argument("--precision", default="auto", help="train.precision: auto, bf16, fp16, fp32")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per side (best is reported)")
    ap.add_argument("--model", default=str(MODEL), help="model folder (default: shared stories260K)")
    ap.add_argument("--data", default=str(DATA), help="preference JSONL (default: the UltraFeedback sample)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()

    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_engine.modeling import autocast_dtype, pick_device
    from dpo_engine.reference import compute_reference_logps

    if not Path(args.model).is_dir() or not Path(args.data).is_file():
        sys.exit(f"needs {args.model} and {args.data} (../shared beside the checkout, or DPO_SHARED)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device()
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    t0 = time.perf_counter()
    rows = tokenized_rows(tok, args.rows, args.max_length, Path(args.data))
    t_tok = time.perf_counter() - t0
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
    pad = tok.pad_token_id
    real = int(2 * rows["prompt_len"].sum() + rows["chosen_len"].sum() + rows["rejected_len"].sum())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def ours(part):
        return compute_reference_logps(model, part, pad_id=pad, batch_size=args.batch_size,
                                       chunk_size=args.chunk_size, device=device, precision=args.precision)

    def naive(part):
        return naive_reference_logps(model, part, pad_id=pad, batch_size=args.batch_size, device=device,
                                     precision=args.precision)

    def timed(fn):
        sync()
        t = time.perf_counter()
        res = fn(rows)
        sync()
        return time.perf_counter() - t, res

    for fn in (ours, naive):  # warm-up
        fn(rows.iloc[:min(len(rows), max(2, args.batch_size // 2))])
    times = {"ours": [], "naive": []}
    for _ in range(args.repeats):  # interleaved, so that a load change on the machine hits both sides
        sec, got = timed(ours)
        times["ours"].append(sec)
        sec, (want, naive_slots) = timed(naive)
        times["naive"].append(sec)
    t_ours, t_naive = min(times["ours"]), min(times["naive"])
    ours_slots = sorted_padded_tokens(rows, args.batch_size)
    mine = np.stack([got["ref_chosen_logps"].to_numpy(), got["ref_rejected_logps"].to_numpy()], axis=1)
    diff = float(np.abs(mine - want).max())
    scale = float(np.abs(want).max())

    amp = autocast_dtype(args.precision, device)
    cores = os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"reference precompute, {Path(args.model).name} ({sum(p.numel() for p in model.parameters()):,} params, "
          f"V {model.get_output_embeddings().weight.shape[0]}) on {Path(args.data).parent.name}")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device {device.type} ({name}, {cores} cores, {torch.get_num_threads()} torch threads), "
          f"autocast {amp or 'off'} (precision {args.precision}); "
          f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}; "
          f"load average {load}")
    print(f"{len(rows)} pairs = {2 * len(rows)} sequences, {real:,} real tokens, max_length {args.max_length}, "
          f"batch {args.batch_size} sequences; tokenized in {t_tok:.1f}s; best of {args.repeats}")
    print(f"{'variant':<8}{'seconds':>10}{'tokens/s':>12}{'padded slots':>14}{'padding':>9}{'vs ours':>9}")
    for name, sec, slots in (("ours", t_ours, ours_slots), ("naive", t_naive, naive_slots)):
        print(f"{name:<8}{sec:>10.2f}{real / sec:>12,.0f}{slots:>14,}{1 - real / slots:>9.1%}{sec / t_ours:>9.2f}")
    print("all times (s): " + "; ".join(f"{k} " + " ".join(f"{x:.2f}" for x in v) for k, v in times.items()))
    print(f"speed-up ours/naive: {t_naive / t_ours:.2f}x; max |ours - naive| log-prob {diff:.2e} "
          f"(largest |log-prob| {scale:.1f})")


if __name__ == "__main__":
    main()
