"""Our DPO trainer vs TRL's DPOTrainer, side by side, each in its own subprocess.

Same random-init 2-layer d=128 Llama on the GPT-NeoX-20B tokenizer (V 50,277: the LM head dominates),
the same UltraFeedback pairs (tokenized as TRL does: EOS appended, prompt / prompt+completion split on
their common prefix, keep_start truncation to --max-length, prompts that fill it dropped), the same
pairs per step and steps, fp32, no gradient checkpointing, reference log-probs precomputed by both
(TRL: ``precompute_ref_log_probs=True``). Reports wall time (setup = tokenization + reference pass,
then training), real (non-padding) tokens/s of training, and peak RSS.

    python bench/bench_trainer.py [--steps 10] [--pairs-per-step 8] [--max-length 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "models/gpt-neox-20b-tokenizer/tokenizer.json"
DATA = SHARED / "data/ultrafeedback-binarized-sample/train_clean.jsonl"


def load_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), eos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok


def make_model(vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg)


def text_rows(n: int, tok, max_length: int) -> list[dict]:
    """The first ``n`` rows whose prompt leaves room for a completion (TRL's keep_start filter)."""
    rows = []
    with open(DATA) as f:
        for line in f:
            r = json.loads(line)
            if len(tok(r["prompt"])["input_ids"]) < max_length:
                rows.append({k: r[k] for k in ("prompt", "chosen", "rejected")})
            if len(rows) == n:
                break
    return rows


def tokenize_like_trl(row: dict, tok, max_length: int) -> dict:
    def prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    p = tok(row["prompt"])["input_ids"]
    pc = tok(row["prompt"] + row["chosen"] + tok.eos_token)["input_ids"]
    pr = tok(row["prompt"] + row["rejected"] + tok.eos_token)["input_ids"]
    n = min(prefix(p, pc), prefix(p, pr))
    return {"prompt_input_ids": p[:n], "chosen_input_ids": pc[n:max_length],
            "rejected_input_ids": pr[n:max_length]}


def real_tokens(pairs: list[dict]) -> int:
    return sum(2 * len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) + len(r["rejected_input_ids"])
               for r in pairs)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_ours(args, tok) -> dict:
    import pandas as pd

    from data_contracts.config import LossConfig, TrainConfig
    from dpo_engine.refcache import compute_reference_logps
    from dpo_engine.trainer import train

    t0 = time.perf_counter()
    rows = text_rows(args.steps * args.pairs_per_step, tok, args.max_length)
    pairs = pd.DataFrame([{"example_id": f"ex{i}", **tokenize_like_trl(r, tok, args.max_length)}
                          for i, r in enumerate(rows)])
    model = make_model(len(tok))
    t1 = time.perf_counter()
    ref = compute_reference_logps(model, pairs, pad_id=tok.pad_token_id, batch_size=args.pairs_per_step)
    t2 = time.perf_counter()
    cfg = TrainConfig(per_device_train_batch_size=args.pairs_per_step, max_steps=args.steps,
                      learning_rate=1e-6, logging_steps=1, seed=0)
    with tempfile.TemporaryDirectory() as out:
        train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=tok.pad_token_id, out_dir=Path(out))
    t3 = time.perf_counter()
    return {"setup_s": t1 - t0, "precompute_s": t2 - t1, "train_s": t3 - t2,
            "tokens": real_tokens(pairs.to_dict("records"))}


def worker_trl(args, tok) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    t0 = time.perf_counter()
    rows = text_rows(args.steps * args.pairs_per_step, tok, args.max_length)
    model = make_model(len(tok))
    tokens = real_tokens([tokenize_like_trl(r, tok, args.max_length) for r in rows])
    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(output_dir=out, report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
                        per_device_train_batch_size=args.pairs_per_step, gradient_accumulation_steps=1,
                        max_steps=args.steps, learning_rate=1e-6, max_length=args.max_length,
                        precompute_ref_log_probs=True, precompute_ref_batch_size=args.pairs_per_step,
                        logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0)
        t1 = time.perf_counter()
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
        t2 = time.perf_counter()
        trainer.train()
        t3 = time.perf_counter()
    # DPOTrainer.__init__ tokenizes and runs the reference pass; report both together as "precompute"
    return {"setup_s": t1 - t0, "precompute_s": t2 - t1, "train_s": t3 - t2, "tokens": tokens}


def run_worker(which: str, args) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, __file__, "--worker", which, "--steps", str(args.steps),
               "--pairs-per-step", str(args.pairs_per_step), "--max-length", str(args.max_length)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        sys.exit(f"{which} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pairs-per-step", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--worker", choices=["ours", "trl"])
    args = ap.parse_args()
    if not TOKENIZER.is_file() or not DATA.is_file():
        print(f"skipped: {TOKENIZER} or {DATA} is absent (needs ../shared beside the checkout)")
        return
    if args.worker:
        sys.path.insert(0, str(ROOT))
        tok = load_tokenizer()
        out = (worker_ours if args.worker == "ours" else worker_trl)(args, tok)
        out["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(out))
        return

    import torch
    import transformers
    import trl

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}; Llama d=128 L=2 V=50,277 fp32; "
          f"{args.steps} steps x {args.pairs_per_step} pairs, max_length {args.max_length}")
    res = {w: run_worker(w, args) for w in ("ours", "trl")}
    print(f"{'':6} {'setup s':>8} {'ref pass s':>10} {'train s':>8} {'total s':>8} {'train tok/s':>11} "
          f"{'peak RSS MB':>11}")
    for w, r in res.items():
        r["total_s"] = r["setup_s"] + r["precompute_s"] + r["train_s"]
        r["tok_s"] = r["tokens"] / r["train_s"]
        print(f"{w:6} {r['setup_s']:8.1f} {r['precompute_s']:10.1f} {r['train_s']:8.1f} {r['total_s']:8.1f} "
              f"{r['tok_s']:11.0f} {r['peak_rss_mb']:11.0f}")
    o, t = res["ours"], res["trl"]
    print(f"real tokens per run: {o['tokens']:,} (ours) / {t['tokens']:,} (trl)")
    print(f"ours/TRL: train time {o['train_s'] / t['train_s']:.2f}x, total {o['total_s'] / t['total_s']:.2f}x, "
          f"tokens/s {o['tok_s'] / t['tok_s']:.2f}x, peak RSS {o['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
