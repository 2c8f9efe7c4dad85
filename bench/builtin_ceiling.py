"""What a model already knows of the bundled answer-format questions: the demo's ceiling.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/builtin_ceiling.py [--model builtin:smollm2-135m-instruct]
                                                               [--split eval] [--rows 300]

DPO on the bundled set teaches a format (``Answer: <answer>``, then end the turn); it cannot teach
a 135M model arithmetic in 32 steps. This prints, per question family, the share of prompts the
model answers right when its reply is forced to start with ``Answer:`` (greedy, up to 8 new
tokens, first line kept, scored by ``data_contracts.builtin:judge``), and the mean judge score a
perfectly formatted policy with that knowledge would get (0.5 + 0.5 x accuracy). Run it on a
trained model folder (``.dpo/runs/<run>/train/model``) to see what training added.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--split", choices=("train", "eval"), default="eval")
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_contracts import builtin
    from dpo_engine.modeling.loading import resolve_model_path

    path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    train, eval_ = builtin.generate(seed=0)
    rows = (eval_ if args.split == "eval" else train)[:args.rows]
    right: dict[str, list[int]] = defaultdict(list)
    t0 = time.perf_counter()
    for i in range(0, len(rows), args.batch_size):
        chunk = rows[i:i + args.batch_size]
        texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) + "Answer:"
                 for r in chunk]
        enc = tok(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        for row, ids in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            reply = "Answer:" + tok.decode(ids, skip_special_tokens=True).split("\n")[0]
            right[row["family"]].append(builtin.judge(row["prompt"], reply, row) == 1.0)
    print(f"model {args.model} ({path}), {len(rows)} {args.split} prompts, {time.perf_counter() - t0:.0f} s")
    print(f"{'family':<12} {'prompts':>7} {'right':>6}")
    for family, hits in sorted(right.items()):
        print(f"{family:<12} {len(hits):>7} {sum(hits) / len(hits):>6.2f}")
    acc = sum(sum(h) for h in right.values()) / len(rows)
    print(f"{'all':<12} {len(rows):>7} {acc:>6.2f}   ceiling of the mean judge score: {0.5 + 0.5 * acc:.2f}")


if __name__ == "__main__":
    main()
