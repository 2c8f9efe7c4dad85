"""Our DPO trainer vs TRL's DPOTrainer, side by side, each in its own subprocess.

Same random-init 2-layer d=128 Llama on the GPT-NeoX-20B tokenizer (V 50,277: the LM head dominates),
the same UltraFeedback pairs (tokenized as TRL does: EOS appended, prompt / prompt+completion split on
their common prefix, keep_start truncation to --max-length, prompts that fill it dropped), the same
pairs per step and steps, fp32, no gradient checkpointing, reference log-probs precomputed by both
(TRL: ``precompute_ref_log_probs=True``). Reports wall time (setup = tokenization + reference pass,
then training), real (non-padding) tokens/s of training, and peak RSS.

    python bench/bench_trainer.py [--steps 10] [--pairs-per-step 8] [--max-length 256]

``--gpu``: a Qwen3-0.6B-shaped model (d 1024, 28 layers, V 151,936, tied embeddings, random
weights), fp32 master weights with bf16 autocast on CUDA for both, max_length 1024, sdpa attention.
Each side first trains 2 throw-away steps (kernel compilation, cuBLAS/allocator warm-up), then the
timed run; peak memory is torch.cuda.max_memory_allocated of the timed run; MFU = 6 x parameters x
real tokens / time / 989 TFLOP/s (H100 SXM dense bf16). ``ours`` runs padded and packed
(``padding_free``) when --packed is given, with compiled layers with --compile, and with bf16 weights
(fp32 master copies in the optimizer, bf16 activations) with --bf16-weights.
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
SHARED = Path(os.environ.get("DPO_SHARED", ROOT.parent / "shared"))
H100_BF16_TFLOPS = 989.0
TOKENIZER = SHARED / "models/gpt-neox-20b-tokenizer/tokenizer.json"
DATA = SHARED / "data/ultrafeedback-binarized-sample/train_clean.jsonl"


def load_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER), eos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok


def make_model(vocab: int, gpu: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if gpu:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                          max_position_embeddings=4096, attn_implementation="sdpa")
        return Qwen3ForCausalLM(cfg).cuda()
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


def _gpu_mark():
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return time.perf_counter()


def _gpu_peak_mb() -> float:
    import torch

    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def worker_ours(args, tok) -> dict:
    import pandas as pd

    from data_contracts.config import LossConfig, TrainConfig
    from dpo_engine.reference import compute_reference_logps
    from dpo_engine.training import train

    t0 = time.perf_counter()
    if args.fixed_length:  # random ids: prompt of a quarter, two completions of the rest
        g = __import__("torch").Generator().manual_seed(0)
        p_len = args.fixed_length // 4
        ids = lambda n: __import__("torch").randint(0, len(tok), (n,), generator=g).tolist()  # noqa: E731
        pairs = pd.DataFrame([{"example_id": f"ex{i}", "prompt_input_ids": ids(p_len),
                               "chosen_input_ids": ids(args.fixed_length - p_len),
                               "rejected_input_ids": ids(args.fixed_length - p_len)}
                              for i in range(args.steps * args.pairs_per_step)])
    else:
        rows = text_rows(args.steps * args.pairs_per_step, tok, args.max_length)
        pairs = pd.DataFrame([{"example_id": f"ex{i}", **tokenize_like_trl(r, tok, args.max_length)}
                              for i, r in enumerate(rows)])
    opts = ours_options(args.worker)
    model = make_model(len(tok), args.gpu)
    if "bf16" in opts:  # 16-bit weights and activations, fp32 master copies in the optimizer
        model = model.to(__import__("torch").bfloat16)
    if "compile" in opts:
        from dpo_engine.modeling import compile_layers

        compile_layers(model)
    device = "cuda" if args.gpu else "cpu"
    t1 = time.perf_counter()
    ref = compute_reference_logps(model, pairs, pad_id=tok.pad_token_id, batch_size=args.pairs_per_step,
                                  device=device)
    t2 = time.perf_counter()

    stamps = []

    def run(steps: int) -> None:
        cfg = TrainConfig(per_device_train_batch_size=args.pairs_per_step, max_steps=steps,
                          learning_rate=1e-6, logging_steps=1, seed=0, padding_free="packed" in opts,
                          pad_to_multiple_of=64 if "pad64" in opts else None, save_steps=10**6)
        with tempfile.TemporaryDirectory() as out:
            train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=tok.pad_token_id, out_dir=Path(out),
                  device=device, log_fn=lambda m, step: stamps.append((time.perf_counter(), m)))

    out = {}
    if args.gpu:
        run(2)  # warm-up: kernel compilation, allocator
        t2 = _gpu_mark()
    stamps.clear()
    run(args.steps)
    if args.gpu:
        out["peak_gpu_mb"] = _gpu_peak_mb()
        out["step_mfu"] = [round(m.get("mfu", 0.0), 3) for _, m in stamps]
    # up to the last optimizer step: the final checkpoint write is not training (TRL saves nothing)
    t3 = stamps[-1][0]
    return {**out, "setup_s": t1 - t0, "precompute_s": t2 - t1, "train_s": t3 - t2,
            "tokens": real_tokens(pairs.to_dict("records")), "params": sum(p.numel() for p in model.parameters())}


def worker_trl(args, tok) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    t0 = time.perf_counter()
    rows = text_rows(args.steps * args.pairs_per_step, tok, args.max_length)
    model = make_model(len(tok), args.gpu)
    tokens = real_tokens([tokenize_like_trl(r, tok, args.max_length) for r in rows])

    def trainer_for(steps: int, out: str):
        cfg = DPOConfig(output_dir=out, report_to=[], use_cpu=not args.gpu, bf16=args.gpu,
                        gradient_checkpointing=False,
                        per_device_train_batch_size=args.pairs_per_step, gradient_accumulation_steps=1,
                        max_steps=steps, learning_rate=1e-6, max_length=args.max_length,
                        precompute_ref_log_probs=True, precompute_ref_batch_size=args.pairs_per_step,
                        logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0)
        return DPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok)

    out_d = {}
    with tempfile.TemporaryDirectory() as out:
        if args.gpu:  # warm-up run, then a fresh trainer (its optimizer state freed first)
            import gc

            warm = trainer_for(2, out)
            warm.train()
            del warm
            gc.collect()
            __import__("torch").cuda.empty_cache()
        t1 = time.perf_counter()
        trainer = trainer_for(args.steps, out)
        t2 = _gpu_mark() if args.gpu else time.perf_counter()
        trainer.train()
        if args.gpu:
            out_d["peak_gpu_mb"] = _gpu_peak_mb()
        t3 = time.perf_counter()
    # DPOTrainer.__init__ tokenizes and runs the reference pass; report both together as "precompute"
    return {**out_d, "setup_s": t1 - t0, "precompute_s": t2 - t1, "train_s": t3 - t2, "tokens": tokens,
            "params": sum(p.numel() for p in model.parameters())}


# "ours" variants: "ours" plus any of these joined with "+", e.g. ours+bf16+compile
OURS_OPTIONS = {"packed": "padding_free packing", "compile": "compiled decoder layers",
                "bf16": "bf16 weights, fp32 master copies", "pad64": "pad_to_multiple_of 64"}
ALIASES = {"ours_packed": "ours+packed", "ours_compiled": "ours+compile", "ours_bf16": "ours+bf16"}


def ours_options(name: str) -> set[str]:
    base, *mods = ALIASES.get(name, name).split("+")
    if base != "ours" or not set(mods) <= set(OURS_OPTIONS):
        sys.exit(f"unknown worker {name!r}: trl, or ours[+{'|+'.join(OURS_OPTIONS)}]")
    return set(mods)


def run_worker(which: str, args) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "HF_DATASETS_CACHE": cache, "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, __file__, "--worker", which, "--steps", str(args.steps),
               "--pairs-per-step", str(args.pairs_per_step), "--max-length", str(args.max_length)]
        cmd += (["--gpu"] if args.gpu else []) + [f"--fixed-length={args.fixed_length}"]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        sys.exit(f"{which} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pairs-per-step", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--gpu", action="store_true", help="Qwen3-0.6B shape on CUDA, bf16 autocast")
    ap.add_argument("--packed", action="store_true", help="also run ours with padding_free packing")
    ap.add_argument("--compile", action="store_true", help="also run ours with compiled decoder layers")
    ap.add_argument("--bf16-weights", action="store_true",
                    help="also run ours with bf16 weights (fp32 master copies: train.master_weights)")
    ap.add_argument("--fixed-length", type=int, default=0,
                    help="ours only: random pairs of exactly this many tokens (MFU at a fixed shape)")
    ap.add_argument("--workers", default="", help="comma-separated list to run instead, e.g. "
                    "ours,ours+bf16,ours+bf16+compile+pad64,trl (options: " + ", ".join(
                        f"{k}: {v}" for k, v in OURS_OPTIONS.items()) + ")")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gpu and args.max_length == 256:
        args.max_length = 1024
    if not TOKENIZER.is_file() or not DATA.is_file():
        print(f"skipped: {TOKENIZER} or {DATA} is absent (needs ../shared beside the checkout)")
        return
    if args.worker:
        sys.path.insert(0, str(ROOT))
        tok = load_tokenizer()
        out = (worker_trl if args.worker == "trl" else worker_ours)(args, tok)
        out["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(out))
        return

    import torch
    import transformers
    import trl

    dev = torch.cuda.get_device_name() if args.gpu else f"{platform.processor() or platform.machine()}, " \
        f"{os.cpu_count()} CPUs"
    model_desc = "Qwen3-0.6B shape (d 1024, 28 layers, V 151,936) bf16 autocast" if args.gpu else \
        "Llama d=128 L=2 V=50,277 fp32"
    print(f"{dev}, torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{model_desc}; {args.steps} steps x {args.pairs_per_step} pairs, max_length {args.max_length}")
    workers = ["ours"] + (["ours_packed"] if args.packed else []) + (["ours_compiled"] if args.compile else []) \
        + (["ours_bf16"] if args.bf16_weights else []) + ([] if args.fixed_length else ["trl"])
    if args.workers:
        workers = args.workers.split(",")
    for w in workers:
        if w != "trl":
            ours_options(w)
    res = {w: run_worker(w, args) for w in workers}
    mem = "peak_gpu_mb" if args.gpu else "peak_rss_mb"
    width = max(11, *(len(w) for w in workers))
    print(f"{'':{width}} {'setup s':>8} {'ref pass s':>10} {'train s':>8} {'total s':>8} {'train tok/s':>11} "
          f"{'peak MB':>9}" + (f" {'MFU':>6}" if args.gpu else ""))
    for w, r in res.items():
        r["total_s"] = r["setup_s"] + r["precompute_s"] + r["train_s"]
        r["tok_s"] = r["tokens"] / r["train_s"]
        mfu = 6 * r["params"] * r["tok_s"] / (H100_BF16_TFLOPS * 1e12)
        print(f"{w:{width}} {r['setup_s']:8.1f} {r['precompute_s']:10.1f} {r['train_s']:8.2f} {r['total_s']:8.1f} "
              f"{r['tok_s']:11.0f} {r[mem]:9.0f}" + (f" {mfu:6.1%}" if args.gpu else ""))
    for w in workers:
        if "step_mfu" in res[w]:
            print(f"{w} per-step MFU (trainer's own estimate): {res[w]['step_mfu']}")
    print("real tokens per run: " + ", ".join(f"{r['tokens']:,} ({w})" for w, r in res.items()))
    if "trl" not in res:
        return
    t = res["trl"]
    for w in [w for w in workers if w != "trl"]:
        o = res[w]
        print(f"{w}/TRL: train time {o['train_s'] / t['train_s']:.2f}x, total {o['total_s'] / t['total_s']:.2f}x, "
              f"tokens/s {o['tok_s'] / t['tok_s']:.2f}x, peak memory {o[mem] / t[mem]:.2f}x")

if __name__ == "__main__":
    main()
