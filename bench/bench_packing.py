"""Padded vs padding-free (packed) DPO forward+backward on a length-skewed set: real tokens per second.

Completion lengths follow a long-tailed (log-normal) distribution, so a padded micro-batch is mostly
padding. Both layouts run the same micro-batches through ``pair_logps`` + the sigmoid loss + backward
on a small random Llama (CPU by default).

    python bench/bench_packing.py [--pairs 64] [--batch 8] [--hidden 256] [--layers 4] [--attn sdpa]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_contracts.config import LossConfig  # noqa: E402
from dpo_engine.modeling import pair_batch, pair_logps  # noqa: E402
from dpo_engine.modeling import loss_from_config  # noqa: E402


def skewed_pairs(n: int, vocab: int, seed: int, median: int, cap: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def length() -> int:
        return int(min(cap, max(1, torch.empty(1).log_normal_(mean=float(torch.log(torch.tensor(median))),
                                                              std=1.0, generator=g).item())))

    def ids(k):
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    return [{"prompt_input_ids": ids(length() // 2 + 1), "chosen_input_ids": ids(length()),
             "rejected_input_ids": ids(length())} for _ in range(n)]


def run(model, rows, batch: int, packed: bool, repeats: int) -> tuple[float, int, int]:
    cfg = LossConfig()
    best, real, slots = float("inf"), 0, 0
    for _ in range(repeats + 1):  # the first pass warms up
        t0 = time.perf_counter()
        real = slots = 0
        for b0 in range(0, len(rows), batch):
            mb = rows[b0:b0 + batch]
            fw = pair_logps(model, mb, 0, loss_cfg=cfg, padding_free=packed)
            zeros = torch.zeros(len(mb), dtype=torch.float64)
            loss = loss_from_config(cfg, fw["chosen"], fw["rejected"], zeros, zeros).losses.mean()
            loss.backward()
            real += fw["batch"].num_tokens
            slots += fw["batch"].input_ids.numel()
        model.zero_grad(set_to_none=True)
        if _ > 0:
            best = min(best, time.perf_counter() - t0)
    return best, real, slots


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--median", type=int, default=48, help="median sequence part length (tokens)")
    ap.add_argument("--cap", type=int, default=1024)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                      num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=4096,
                      attn_implementation=args.attn)
    model = LlamaForCausalLM(cfg).train()
    rows = skewed_pairs(args.pairs, args.vocab, 0, args.median, args.cap)
    lens = sorted(len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) for r in rows)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; Llama d={args.hidden} L={args.layers} V={args.vocab} attn={args.attn}; {args.pairs} "
          f"pairs, batch {args.batch}; sequence length median {lens[len(lens) // 2]}, max {lens[-1]}")
    results = {}
    for packed in (False, True):
        sec, real, slots = run(model, rows, args.batch, packed, args.repeats)
        results[packed] = sec
        print(f"{'packed' if packed else 'padded':>7}: {real / sec:9.0f} real tokens/s  ({sec:.2f} s, "
              f"{real} real tokens in {slots} slots, {100 * (1 - real / slots):.0f}% padding)")
    print(f"speed-up packed / padded: {results[False] / results[True]:.2f}x")


if __name__ == "__main__":
    main()
