"""Tiny vision-language models built inside the tests (no files from a hub): a LLaVA (CLIP vision
tower + Llama) and an Idefics3 (SigLIP-style tower + connector + Llama, the SmolVLM layout), each
with its processor (the character tokenizer of ``tiny`` + the image processor class + a chat
template that renders ``{"type": "image"}`` parts), and generated preference rows with images.

``scripts/make_tiny_vlm.py`` writes the same model and data for ``configs/vision-tiny.yaml``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tiny import tiny_tokenizer

ARCHS = ("llava", "idefics3")
# ChatML; a content list renders its parts: an image part as the model's image token
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}@IMAGE@"
            "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
EXTRA_TOKENS = {"llava": ["<image>"], "idefics3": ["<image>", "<fake_token_around_image>", "<global-img>"]}


def _text_config(vocab: int, hidden: int, layers: int, pad_id: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None)


def tiny_vlm(arch: str = "llava", seed: int = 0, hidden: int = 32, layers: int = 2):
    """(model, processor) of a randomly initialised tiny VLM of ``arch`` (one of ARCHS)."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3ImageProcessorPil, Idefics3Processor, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *EXTRA_TOKENS[arch]]})
    template = TEMPLATE.replace("@IMAGE@", "<image>")
    tok.chat_template = template
    text = _text_config(len(tok), hidden, layers, tok.pad_token_id, tok.eos_token_id)
    image_id = tok.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    if arch == "llava":
        ip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, chat_template=template,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
        cfg = LlavaConfig(text_config=text, image_token_id=image_id, vision_feature_select_strategy="default",
                          vision_feature_layer=-1, tie_word_embeddings=True,
                          vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                         num_attention_heads=2, image_size=28, patch_size=14))
        model = LlavaForConditionalGeneration(cfg)
    elif arch == "idefics3":
        ip = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                       max_image_size={"longest_edge": 32})
        proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=template)
        cfg = Idefics3Config(text_config=text, image_token_id=image_id, scale_factor=2, tie_word_embeddings=True,
                             vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, image_size=32, patch_size=8))
        model = Idefics3ForConditionalGeneration(cfg)
    else:
        raise ValueError(f"unknown tiny VLM architecture {arch!r}; known: {', '.join(ARCHS)}")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval(), proc


def tiny_vlm_dir(path: Path, arch: str = "llava", seed: int = 0, hidden: int = 32) -> Path:
    """Save a tiny VLM and its processor (tokenizer, image processor, chat template) as an HF folder."""
    model, proc = tiny_vlm(arch, seed, hidden=hidden)
    model.save_pretrained(path, safe_serialization=True)
    proc.save_pretrained(path)
    return Path(path)


COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def color_image(color: str, seed: int, size: tuple[int, int] = (40, 32)):
    """A PIL image: a ``color`` square on a noisy grey background."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    a = rng.integers(90, 160, (h, w, 3), dtype=np.uint8)
    x, y = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    a[y:y + h // 2, x:x + w // 2] = COLORS[color]
    return Image.fromarray(a)


def color_rows(folder: Path, n: int, seed: int = 0, fmt: str = "png") -> list[dict]:
    """``n`` conversational preference rows ("What color is the square?") with one image file each,
    written under ``folder`` (rows reference them by relative path, as a dataset folder would)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    rows = []
    for i in range(n):
        k = seed * 100_003 + i
        color, wrong = names[k % 4], names[(k + 1 + (k // 4) % 3) % 4]
        rel = f"images/{seed}-{i}.{fmt}"
        color_image(color, k).save(folder / rel)
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"},
                                                            {"type": "text", "text": "What color is the square?"}]}],
                     "chosen": [{"role": "assistant", "content": f"Answer: {color}"}],
                     "rejected": [{"role": "assistant", "content": f"Answer: {wrong}"}],
                     "image": rel, "answer": color})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
