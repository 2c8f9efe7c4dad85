"""The MLflow pyfunc of a registered vision-language model: generates from an image and a prompt.

Logged "from code" (``dpo_engine.tracking.vision_model``): MLflow copies this file into the logged
model and runs it when the model is loaded, so a loading machine needs mlflow, transformers, torch
and pillow, not this project. The model's Hugging Face folder (safetensors weights, config, processor:
image processor, tokenizer, chat template) is the artifact ``hf_model``; it is loaded with
``AutoModelForImageTextToText`` / ``AutoProcessor``, safetensors only, no remote code.

Input: a DataFrame (or a list of dicts) with ``prompt`` (the user's text, or a JSON list of chat
messages with ``{"type": "image"}`` parts) and ``image`` (a local path, base64 of the image file, or
its bytes; a list of them for several images). Params: ``max_new_tokens``, ``do_sample``,
``temperature``, ``top_p``. Output: one generated string per row.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

DEFAULTS = {"max_new_tokens": 64, "do_sample": False, "temperature": 1.0, "top_p": 1.0}


def _image(value):
    from PIL import Image

    if hasattr(value, "convert"):
        return value.convert("RGB")
    if isinstance(value, str) and len(value) < 4096 and Path(value).expanduser().is_file():
        data = Path(value).expanduser().read_bytes()
    elif isinstance(value, str):
        try:
            data = base64.b64decode(value.split(",", 1)[-1], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("'image' must be a local path, base64 of an image file or its bytes") from None
    else:
        data = bytes(value)
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def _messages(prompt, n_images: int) -> list[dict]:
    if isinstance(prompt, str) and prompt.lstrip().startswith("["):
        try:
            prompt = json.loads(prompt)
        except ValueError:
            pass
    if isinstance(prompt, list):
        return prompt
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": str(prompt)}]}]


class VisionChatModel(PythonModel):
    """Image + prompt -> generated text, with the registered weights and processor."""

    def load_context(self, context):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from dpo_engine.modeling import LOAD_LOCK  # from_pretrained swaps process-wide globals

        folder = context.artifacts["hf_model"]
        self.processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
        with LOAD_LOCK:
            self.model = AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=True,
                                                                     trust_remote_code=False).eval()

    def predict(self, context, model_input, params=None):
        import torch

        params = {**DEFAULTS, **(params or {})}
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        tok = self.processor.tokenizer
        out = []
        for row in rows:
            images = row.get("image")
            images = [] if images is None else images if isinstance(images, (list, tuple)) else [images]
            images = [_image(x) for x in images]
            text = self.processor.apply_chat_template(_messages(row["prompt"], len(images)), tokenize=False,
                                                      add_generation_prompt=True)
            enc = self.processor(text=[text], images=[images] if images else None, add_special_tokens=False,
                                 return_tensors="pt")
            sample = bool(params["do_sample"])
            with torch.inference_mode():
                gen = self.model.generate(**enc, max_new_tokens=int(params["max_new_tokens"]), do_sample=sample,
                                          temperature=float(params["temperature"]) if sample else None,
                                          top_p=float(params["top_p"]) if sample else None, top_k=None,
                                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            out.append(tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return out


mlflow.models.set_model(VisionChatModel())
