"""Vision-language model: the fused log-prob head against full logits, forward + backward of a DPO
micro-batch, time and peak memory, each variant in its own subprocess.

A randomly initialised LLaVA (CLIP tower, Llama language model of width ``--d`` and vocabulary
``--v``) scores ``--pairs`` pairs (2 x pairs sequences: prompt with one image of 64 image tokens and
``--prompt`` text tokens, completions of ``--completion`` tokens). ``fused``: the engine's
``pair_logps`` (hidden states of completion positions through ``token_logps``, never [N, V] logits);
``full``: ``model(...).logits`` -> log_softmax -> gather over the same batch. Same loss, same
gradients (tests/test_vision_engine.py checks that); reported: median seconds per forward+backward
and the process's peak RSS above its RSS before the first step (CPU) or max allocated (CUDA).

    .venv/bin/python bench/bench_vision_head.py [--v 49152] [--d 256] [--pairs 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _setup(args):
    import numpy as np
    import torch
    from PIL import Image
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_id = tok.convert_tokens_to_ids("<image>")
    proc = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 112},
                                                                crop_size={"height": 112, "width": 112}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=args.v, hidden_size=args.d, intermediate_size=2 * args.d, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=112, patch_size=14)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_id=image_id,
                                                      vision_feature_select_strategy="default",
                                                      vision_feature_layer=-1))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(dev).train()
    rng = np.random.default_rng(0)
    folder = Path(tempfile.mkdtemp())
    ids = lambda n: [int(x) for x in rng.integers(image_id + 1, args.v, n)]  # noqa: E731
    rows = []
    for i in range(args.pairs):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(path)
        ref = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "path": str(path)}
        rows.append({"prompt_input_ids": ids(8) + [image_id] * 64 + ids(args.prompt),
                     "chosen_input_ids": ids(args.completion), "rejected_input_ids": ids(args.completion),
                     "images": json.dumps([ref])})
    return model, proc, rows, dev


def run_variant(name: str, args) -> dict:
    import torch

    from dpo_engine.modeling import VisionInputs, pair_logps

    model, proc, rows, dev = _setup(args)
    vision = VisionInputs(proc, model)
    fw0 = pair_logps(model, rows, 0, vision=vision, device=dev)  # warm-up, and the batch for `full`
    batch = fw0["batch"]
    model.zero_grad()

    def step():
        if name == "fused":
            fw = pair_logps(model, rows, 0, vision=vision, device=dev)
            lp = torch.cat([fw["chosen"], fw["rejected"]])
        else:
            logits = model(input_ids=batch.input_ids, use_cache=False, **batch.extras).logits
            tok = torch.log_softmax(logits.float(), -1).gather(-1, batch.targets[..., None])[..., 0]
            lp = torch.zeros(batch.num_seqs, device=tok.device).index_add(
                0, batch.seq_ids[batch.predict_mask], tok[batch.predict_mask])
        b = len(rows)
        (-torch.nn.functional.logsigmoid(0.1 * (lp[:b] - lp[b:])).mean()).backward()
        model.zero_grad(set_to_none=True)

    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = _rss_mb()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = ((torch.cuda.max_memory_allocated() - base) / 2**20 if dev == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss)
    return {"variant": name, "seconds": sorted(times)[len(times) // 2], "peak_extra_mb": round(peak, 1),
            "tokens": int(batch.attention_mask.sum()), "device": dev}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--v", type=int, default=49152, help="vocabulary (SmolVLM's is 49,280)")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64, help="text tokens after the image")
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return 0
    results = []
    for name in ("fused", "full"):
        argv = [sys.executable, __file__, "--variant", name] + [
            f"--{k}={getattr(args, k)}" for k in ("v", "d", "pairs", "prompt", "completion", "repeats")]
        out = subprocess.run(argv, capture_output=True, text=True, check=True, env={**os.environ,
                                                                                     "PYTHONWARNINGS": "ignore"})
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for r in results:
        print(f"{r['variant']:>6}: {r['seconds']:.3f} s per forward+backward, peak extra memory "
              f"{r['peak_extra_mb']:.0f} MiB ({r['tokens']} tokens, {r['device']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
