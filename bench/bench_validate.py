"""Throughput and memory of data_contracts.validate_split on a large standard (string) JSONL file.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_validate.py [--rows 200000] [--num-proc 1 2 ...]

Generates ROWS explicit rows ``{"prompt", "chosen", "rejected"}`` (short English-like strings, about
1% duplicates and 1% bad rows) into a temporary folder, validates them with a real fast tokenizer
(``../shared/models/gpt-neox-20b-tokenizer/tokenizer.json``, or a small BPE trained here when that
file is absent), and prints, for each ``data.num_proc`` setting (default: 1 and min(CPUs, 8)), each
run in a fresh process and with each tokenizer path (``--paths``: ``fast`` = the exact pre-token
cache of data_contracts/fast_bpe.py, ``rust`` = the tokenizers pipeline alone, DPO_FAST_BPE=0):
rows/s (validation only, file generation excluded), CPU seconds of all processes, the peak RSS of
the main process and of the largest worker, and the load average; then checks that every run wrote
the same report and a byte-identical valid.parquet. No chat template: this measures the string path.
"""

from __future__ import annotations

import argparse
import hashlib
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
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT.parent / "shared" / "models" / "gpt-neox-20b-tokenizer" / "tokenizer.json"

WORDS = ("the a of and to in is was that it for on with as his he at by had from they this but were "
         "story time once upon there little girl boy dog cat tree house river sun moon happy sad big "
         "small ran jumped played found lost friend mother father garden ball red blue green quick "
         "brown fox lazy over under around went saw said asked answer question because then").split()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        prev = None
        for i in range(n):
            r = rng.random()
            if prev is not None and r < 0.01:
                line = prev  # duplicate
            elif r < 0.02:
                line = json.dumps({"prompt": sentence(rng, 4, 12), "chosen": "same", "rejected": "same"})
            else:
                line = json.dumps({"prompt": sentence(rng, 6, 24) + "?",
                                   "chosen": " " + sentence(rng, 4, 20) + ".",
                                   "rejected": " " + sentence(rng, 4, 20) + "."})
            f.write(line + "\n")
            prev = line


def load_tokenizer():
    from transformers import PreTrainedTokenizerFast
    if TOKENIZER.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), eos_token="<|endoftext|>"), str(TOKENIZER)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    rng = random.Random(1)
    tk.train_from_iterator((sentence(rng, 5, 30) for _ in range(20000)),
                           trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>",
                                   unk_token="<unk>"), "BPE trained in the script (vocab 2000)"


def run_one(src: Path, out: Path, num_proc: int, limit, batch_rows) -> dict:
    """Validate ``src`` once in this process; timings, report and peak RSS (this process and the
    largest worker)."""
    from data_contracts.config import DataConfig
    from data_contracts.sources import BATCH_ROWS
    from data_contracts.validation import validate_split

    tok, tok_name = load_tokenizer()
    rss_before = peak_rss_mb()
    cfg = DataConfig(max_length=1024, max_invalid_fraction=1.0, num_proc=num_proc)
    t0, c0 = time.perf_counter(), time.process_time()
    rep = validate_split(src, out, tok, cfg, limit=limit, batch_rows=batch_rows or BATCH_ROWS)
    secs = time.perf_counter() - t0
    cpu = time.process_time() - c0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"tokenizer": tok_name, "secs": secs, "cpu": cpu + kids.ru_utime + kids.ru_stime,
            "rss": peak_rss_mb(), "rss_before": rss_before, "rss_worker": kids.ru_maxrss / 1024,
            "load": os.getloadavg()[0], "report": {k: rep[k] for k in (
                "valid", "rejected", "reject_counts", "duplicates", "limited_out", "fingerprint")},
            "valid_mb": (out / "valid.parquet").stat().st_size / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-rows", type=int, default=None)
    ap.add_argument("--num-proc", type=int, nargs="*", default=None,
                    help="settings to compare (default: 1 and min(CPUs, 8))")
    ap.add_argument("--paths", nargs="*", default=["fast", "rust"], choices=["fast", "rust"],
                    help="tokenizer paths to compare: fast = data_contracts.fast_bpe's pre-token cache, "
                         "rust = the tokenizers pipeline alone (DPO_FAST_BPE=0)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each setting, interleaved (the table shows the fastest, and the median)")
    ap.add_argument("--one", nargs=3, metavar=("SRC", "OUT", "NUM_PROC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        src, out, n = args.one
        print(json.dumps(run_one(Path(src), Path(out), int(n), args.limit, args.batch_rows)))
        return

    settings = args.num_proc or [1, min(os.cpu_count() or 1, 8)]
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as d:
        src = Path(d) / "rows.jsonl"
        t0 = time.perf_counter()
        write_rows(src, args.rows)
        gen_s = time.perf_counter() - t0
        size_mb = src.stat().st_size / 2**20
        runs: dict[tuple, list] = {(n, p): [] for n in settings for p in args.paths}
        for _ in range(args.repeat):
            for n, path in runs:  # each run in a fresh process: its own peak RSS
                cmd = [sys.executable, __file__, "--one", str(src), str(Path(d) / f"out{n}{path}"), str(n)]
                cmd += ["--limit", str(args.limit)] if args.limit else []
                cmd += ["--batch-rows", str(args.batch_rows)] if args.batch_rows else []
                env = {**os.environ, "DPO_FAST_BPE": "1" if path == "fast" else "0"}
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                runs[n, path].append(json.loads(out.strip().splitlines()[-1]))
        results = [(n, min(rs, key=lambda r: r["secs"])) for n, rs in runs.items()]
        medians = {n: sorted(r["secs"] for r in rs)[len(rs) // 2] for n, rs in runs.items()}
        outputs = {hashlib.sha256((Path(d) / f"out{n}{p}" / "valid.parquet").read_bytes()).hexdigest()
                   for n, p in runs}
    first = results[0][1]
    print(f"tokenizer: {first['tokenizer']}")
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    print(f"input: {args.rows} rows, {size_mb:.1f} MiB JSONL (generated in {gen_s:.1f}s)")
    rep = first["report"]
    print(f"report: valid {rep['valid']}, rejected {rep['rejected']} {rep['reject_counts']}, "
          f"duplicates {rep['duplicates']}, limited out {rep['limited_out']}; valid.parquet "
          f"{first['valid_mb']:.1f} MiB")
    same = all(r["report"] == rep for rs in runs.values() for r in rs)
    print(f"reports identical across settings: {same}; valid.parquet byte-identical: {len(outputs) == 1}")
    print()
    print(f"fastest of {args.repeat} run(s) per setting, interleaved; load avg: 1-minute average at "
          f"the end of that run")
    print()
    print("| num_proc | tokenizer path | seconds | rows/s | median rows/s | CPU s (all processes) | "
          "peak RSS main | peak RSS worker | load avg |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (n, path), r in results:
        worker = f"{r['rss_worker']:.0f} MiB" if n > 1 else "-"
        print(f"| {n} | {path} | {r['secs']:.2f} | {args.rows / r['secs']:,.0f} | "
              f"{args.rows / medians[n, path]:,.0f} | {r['cpu']:.1f} | "
              f"{r['rss']:.0f} MiB ({r['rss_before']:.0f} before) | {worker} | {r['load']:.1f} |")
    best = dict(results)
    for n in settings:
        if (n, "fast") in best and (n, "rust") in best:
            print(f"num_proc {n}: fast path {best[n, 'rust']['secs'] / best[n, 'fast']['secs']:.2f}x "
                  f"the rows/s of the Rust pipeline alone")
    if not same or len(outputs) != 1:
        sys.exit("error: the settings produced different reports")


if __name__ == "__main__":
    main()
