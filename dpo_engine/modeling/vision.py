"""Vision-language models: telling one from a text model, loading its processor as safely as models
are loaded, the per-batch image inputs the model body takes, and freezing the vision tower.

A VLM (``*ForConditionalGeneration`` with a ``vision_config``) runs through the same engine as a
text model: its body (``model.model``) takes ``input_ids`` plus the image inputs and returns the
language model's hidden states, which go through the fused head (``logps.sequence_logps``). The
image inputs of a batch (``pixel_values`` and what else the processor makes: ``image_grid_thw``,
``pixel_attention_mask``, ...) are rebuilt by :class:`VisionInputs` from the rows' stored image
references (``data_contracts.images``) by the model's processor, each file checked against its
sha256, in the sequences' order: a pair's images go with both its chosen and its rejected sequence.
Multimodal token type ids (``mm_token_type_ids`` / ``token_type_ids``) come from the batch's ids.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import torch
from torch import nn

from data_contracts.config import ConfigError, ModelConfig, PeftConfig, RunConfig
from data_contracts.images import open_image, row_refs
from dpo_engine.modeling.batching import SeqBatch
from dpo_engine.modeling.loading import ModelError, is_vision_model
from dpo_engine.modeling.logps import lm_body_and_head

# the vision encoder and the projector onto the language model, as architectures name them
VISION_TOWERS = ("visual", "vision_tower", "vision_model", "vision_encoder", "image_encoder")
PROJECTORS = ("multi_modal_projector", "connector", "mm_projector", "merger", "embed_vision")


def load_processor(cfg: ModelConfig, model_path: str, tokenizer=None):
    """The model's processor (``AutoProcessor``: image processor, tokenizer, chat template) for a
    vision-language model, else None. No remote code unless ``model.trust_remote_code``; processors
    hold no weights. ``tokenizer`` (the run's, ``loading.load_tokenizer``: EOS and chat template
    settings applied) replaces the processor's own, so both tokenize alike; a tokenizer without a
    chat template takes the processor's."""
    if not is_vision_model(model_path, cfg.revision):
        return None
    from transformers import AutoProcessor

    src = cfg.tokenizer or model_path
    try:
        proc = AutoProcessor.from_pretrained(src, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, TypeError, ImportError) as e:
        text = str(e).strip()
        raise ModelError(f"cannot load the processor of vision-language model {src!r}: "
                         f"{text.splitlines()[0] if text else type(e).__name__}") from None
    if not hasattr(proc, "image_processor"):
        raise ModelError(f"{src!r} is a vision-language model but its processor ({type(proc).__name__}) has no "
                         "image processor")
    if tokenizer is not None:
        if not getattr(tokenizer, "chat_template", None) and getattr(proc, "chat_template", None):
            tokenizer.chat_template = proc.chat_template
        proc.tokenizer = tokenizer
    return proc


def processor_fingerprint(proc) -> str:
    """What decides a processor's image tokens and pixel values: its config and chat template (the
    tokenizer has its own fingerprint)."""
    conf = proc.image_processor.to_dict() if hasattr(proc.image_processor, "to_dict") else {}
    conf = {k: v for k, v in conf.items() if not k.startswith("_")}
    attrs = {k: v for k, v in vars(proc).items() if isinstance(v, (str, int, float, bool)) and not k.startswith("_")}
    blob = json.dumps([type(proc).__name__, conf, attrs, getattr(proc, "chat_template", None)],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class VisionInputs:
    """The image inputs of batches for one model: ``inputs(image_refs, input_ids)`` -> the keyword
    arguments its body takes besides ``input_ids`` (CPU tensors; ``SeqBatch.to`` moves them)."""

    def __init__(self, processor, model: nn.Module):
        self.processor = processor
        body, _ = lm_body_and_head(model)
        self.accepts = set(inspect.signature(body.forward).parameters)
        self._checked: set[str] = set()  # image files whose sha256 was verified in this process
        # the processor's image/video token ids: a generation must not emit them (they would stand
        # for images that are not there)
        self.special_ids = sorted({v for k, v in vars(processor).items() if k.endswith("_token_id")
                                   and isinstance(v, int) and any(w in k for w in ("image", "video", "vision"))})

    def _open(self, ref: dict):
        path = ref["path"]
        img = open_image(Path(path), None if path in self._checked else ref["sha256"])
        self._checked.add(path)
        return img

    def inputs(self, image_refs: list[list[dict]], input_ids: torch.Tensor) -> dict:
        """Image inputs of a batch whose sequence s has the images ``image_refs[s]`` (in the order
        of its image tokens) and the ids ``input_ids[s]``."""
        out = {}
        if any(image_refs):
            try:
                images = [[self._open(r) for r in refs] for refs in image_refs]
            except (OSError, ValueError) as e:
                raise ModelError(f"cannot read a stored image of the validated data: {e}") from None
            made = self.processor(images=images, return_tensors="pt")
            out = {k: v for k, v in made.items() if isinstance(v, torch.Tensor) and k in self.accepts}
        if getattr(self.processor, "return_mm_token_type_ids", False):
            key = "mm_token_type_ids" if "mm_token_type_ids" in self.accepts else "token_type_ids"
            if key in self.accepts:
                out[key] = torch.tensor(self.processor.create_mm_token_type_ids(input_ids.tolist()), dtype=torch.long)
        return out

    def pair_inputs(self, rows: list[dict], batch: SeqBatch) -> dict:
        """Image inputs of ``logps.pair_batch(rows)``: the B chosen sequences, then the B rejected,
        each with its pair's images."""
        refs = [row_refs(r) for r in rows]
        if batch.packed and any(refs):
            raise ConfigError("config error: train.padding_free packs sequences into one row, which rows with "
                              "images do not support; set train.padding_free=false")
        return self.inputs(refs * 2, batch.input_ids)


def _named_children(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2] in names]


def vision_tower(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the vision encoder(s) of a VLM, outermost only."""
    found = _named_children(model, VISION_TOWERS)
    return [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n)]


def freeze_vision(model: nn.Module) -> int:
    """``model.freeze_vision``: the vision encoder's parameters stop requiring grad (the projector
    outside it stays trainable). Returns the number of parameters frozen; a VLM whose tower is not
    found is a ModelError."""
    towers = vision_tower(model)
    if not towers:
        raise ModelError(f"{type(model).__name__}: no vision tower found (looked for {', '.join(VISION_TOWERS)}) "
                         "to freeze; set model.freeze_vision=false")
    n = 0
    for _, m in towers:
        for p in m.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                n += p.numel()
    return n


def language_model_peft(peft: PeftConfig, freeze: bool) -> PeftConfig:
    """The PEFT settings of a VLM: with the vision tower frozen, the adapter goes on the language
    model only (the vision tower and the projector excluded through peft's ``exclude_modules``)."""
    if not freeze or "exclude_modules" in peft.extra:
        return peft
    names = "|".join(VISION_TOWERS + PROJECTORS)
    return peft.model_copy(update={"extra": {**peft.extra, "exclude_modules": rf"(.*\.)?({names})(\..*)?"}})


def check_vision_run(cfg: RunConfig) -> None:
    """What a vision-language run cannot do yet (ConfigError, before any compute)."""
    if cfg.train.padding_free:
        raise ConfigError("config error: train.padding_free is not supported for vision-language models (image "
                          "inputs are per sequence); set train.padding_free=false")
    if cfg.train.compile:
        raise ConfigError("config error: train.compile is not supported for vision-language models yet; "
                          "set train.compile=false")
    if cfg.peft.enabled and cfg.peft.export == "adapter":
        raise ConfigError("config error: peft.export=adapter is not supported for vision-language models yet "
                          "(registration logs full weights with the processor); use peft.export=merged")
