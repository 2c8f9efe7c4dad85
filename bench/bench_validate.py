"""Throughput and memory of data_contracts.validate_split on a large standard (string) JSONL file.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_validate.py [--rows 200000] [--limit N]

Generates ROWS explicit rows ``{"prompt", "chosen", "rejected"}`` (short English-like strings, about
1% duplicates and 1% bad rows) into a temporary folder, validates them with a real fast tokenizer
(``../shared/models/gpt-neox-20b-tokenizer/tokenizer.json``, or a small BPE trained here when that
file is absent), and prints rows/s (validation only, file generation excluded) and the peak RSS of
the process. No chat template: this measures the string path.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-rows", type=int, default=None)
    args = ap.parse_args()

    from data_contracts.config import DataConfig
    from data_contracts.sources import BATCH_ROWS
    from data_contracts.validate import validate_split

    tok, tok_name = load_tokenizer()
    with tempfile.TemporaryDirectory(prefix="bench-validate-") as d:
        src = Path(d) / "rows.jsonl"
        t0 = time.perf_counter()
        write_rows(src, args.rows)
        gen_s = time.perf_counter() - t0
        rss_before = peak_rss_mb()
        cfg = DataConfig(max_length=1024, max_invalid_fraction=1.0)
        t0, c0 = time.perf_counter(), time.process_time()
        rep = validate_split(src, Path(d) / "out", tok, cfg, limit=args.limit,
                             batch_rows=args.batch_rows or BATCH_ROWS)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        size_mb = src.stat().st_size / 2**20
        valid_mb = (Path(d) / "out" / "valid.parquet").stat().st_size / 2**20
    print(f"tokenizer: {tok_name}")
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    print(f"input: {args.rows} rows, {size_mb:.1f} MiB JSONL (generated in {gen_s:.1f}s)")
    print(f"report: valid {rep['valid']}, rejected {rep['rejected']} {rep['reject_counts']}, "
          f"duplicates {rep['duplicates']}, limited out {rep['limited_out']}; valid.parquet "
          f"{valid_mb:.1f} MiB")
    print(f"validate_split: {secs:.2f}s -> {args.rows / secs:,.0f} rows/s "
          f"(CPU {cpu:.2f}s all threads, {args.rows / cpu:,.0f} rows per CPU-second; "
          f"load average {os.getloadavg()[0]:.1f})")
    print(f"peak RSS: {peak_rss_mb():.0f} MiB (before validation: {rss_before:.0f} MiB)")


if __name__ == "__main__":
    main()
