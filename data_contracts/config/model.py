"""The ``model``, ``reference`` and ``peft`` sections: the policy, its reference and its adapter."""

from __future__ import annotations

import ast
import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from data_contracts.config.base import BUILTIN_MODEL, Name, Section


def peft_type_names() -> frozenset[str] | None:
    """The names of peft's ``PeftType`` enum (what ``peft.peft_type`` may be, in any case), or None when
    peft cannot be found. ``import peft`` takes seconds (it imports transformers), so unless it is
    already imported the names are read from the installed peft's ``utils/peft_types.py`` without
    running it."""
    peft = sys.modules.get("peft")
    if peft is not None and hasattr(peft, "PeftType"):  # also methods registered at run time
        return frozenset(m.name for m in peft.PeftType)
    return peft_type_names_from_source()


@functools.cache
def peft_type_names_from_source() -> frozenset[str] | None:
    """The ``PeftType`` member names read from the installed peft's source, without importing it."""
    try:
        spec = importlib.util.find_spec("peft")
        if spec is None or not spec.submodule_search_locations:
            return None
        src = Path(list(spec.submodule_search_locations)[0]) / "utils" / "peft_types.py"
        tree = ast.parse(src.read_text())
    except (ImportError, OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "PeftType":
            names = frozenset(t.id for st in node.body if isinstance(st, ast.Assign)
                              for t in st.targets if isinstance(t, ast.Name) and not t.id.startswith("_"))
            return names or None
    return None


class ModelConfig(Section):
    name_or_path: Name = Field(BUILTIN_MODEL, description="Hugging Face id, local folder, or "
                              "'builtin:smollm2-135m-instruct' (or 'builtin:tiny-qwen3-moe').")
    tokenizer: str | None = Field(None, description="Tokenizer id/folder (default: the model's).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype. auto: "
                                                                     "float32 (TRL's default), with bf16 "
                                                                     "entering through autocast on GPU "
                                                                     "(train.precision); bfloat16/float16 "
                                                                     "halve the weights' memory (the "
                                                                     "optimizer steps fp32 master copies).")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with a hub model (its own "
                                    "modeling files). Off: only transformers' own classes load.")
    chat_template_path: str | None = Field(None, description="A Jinja chat template file, or a model folder "
                                           "whose tokenizer has one, used instead of the tokenizer's own.")
    eos_token: str | None = Field(None, description="Override the tokenizer's EOS (e.g. '<|im_end|>' for "
                                  "a Qwen base model); it must be one token and end every assistant turn "
                                  "of the chat template, else the tokenizer load fails with a config error.")
    init_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra from_pretrained "
                                        "arguments: dtype, attn_implementation, device_map, revision...")
    freeze_vision: bool = Field(True, description="Vision-language models: the vision encoder is not trained "
                                "(its parameters are frozen in full fine-tuning, and a PEFT adapter goes on the "
                                "language model only); false trains it too.")

    @field_validator("init_kwargs")
    @classmethod
    def _no_security_overrides(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in ("trust_remote_code", "use_safetensors"):
            if key in v:
                raise ValueError(f"{key} cannot be set here; "
                                 + ("use model.trust_remote_code" if key == "trust_remote_code"
                                    else "weights are always loaded from safetensors"))
        return v


class ReferenceConfig(Section):
    source: Literal["precomputed", "adapter_disabled", "model"] = Field(
        "precomputed", description="precomputed: a cached pass of the reference model (model_path, else "
        "the policy's base) before training; adapter_disabled (needs peft.enabled): the policy itself with "
        "its adapter switched off, computed during training (no cache, no second model); model: a second, "
        "frozen model (model_path, else a copy of the policy's initial weights) run online during "
        "training (no train cache; needed by sync_ref_model).")
    model_path: str | None = Field(None, description="Reference model: a local folder or hub id, loaded like "
                                   "the policy (safetensors only, model.trust_remote_code, model.init_kwargs); "
                                   "used online with source=model, or precomputed with source=precomputed; "
                                   "null: the policy's base model.")
    batch_size: int = Field(16, ge=1, description="Sequences per reference forward pass.")
    sync_ref_model: bool = Field(False, description="TR-DPO: every ref_model_sync_steps optimizer steps the "
                                 "reference becomes alpha * policy + (1 - alpha) * reference (TRL's "
                                 "semantics). Needs source=model (an online reference with the policy's "
                                 "architecture).")
    ref_model_mixup_alpha: float = Field(0.6, ge=0.0, le=1.0, description="TR-DPO alpha: the policy's share "
                                         "in each reference update.")
    ref_model_sync_steps: int = Field(512, ge=1, description="TR-DPO: optimizer steps between reference "
                                      "updates.")

    @model_validator(mode="after")
    def _online_reference(self) -> "ReferenceConfig":
        if self.sync_ref_model and self.source != "model":
            why = ("the precomputed cache is fixed before training" if self.source == "precomputed"
                   else "the adapter-disabled reference shares its weights with the policy")
            raise ValueError(f"reference.sync_ref_model=true (TR-DPO: reference.ref_model_mixup_alpha, "
                             f"reference.ref_model_sync_steps) needs an online reference model: set "
                             f"reference.source=model (with reference.model_path, or none for a copy of the "
                             f"policy's initial weights); with reference.source={self.source} {why}")
        if self.model_path is not None and self.source == "adapter_disabled":
            raise ValueError("reference.model_path has no effect with reference.source=adapter_disabled "
                             "(the reference is the policy with its adapter off); unset it or use "
                             "source=model")
        return self

class PeftConfig(Section):
    enabled: bool = Field(False, description="Train a PEFT adapter instead of all weights.")
    peft_type: Name = Field("LORA", description="peft's type name (PeftType, any case): LORA, IA3, LOKR, "
                            "LOHA, ...")
    r: int = Field(16, ge=1, description="LoRA rank (LORA only).")
    lora_alpha: float = Field(32.0, gt=0.0, description="LoRA scale numerator (LORA only).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA input dropout (LORA only).")
    target_modules: str | list[str] | None = Field("all-linear", description="Modules that get adapters.")
    modules_to_save: list[str] | None = Field(None, description="Modules trained in full and saved with "
                                              "the adapter (e.g. [lm_head]).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Passed through to the peft config "
                                  "class (e.g. use_dora, use_rslora, init_lora_weights).")
    adapter_path: str | None = Field(None, description="Continue training this saved adapter folder.")
    export: Literal["merged", "adapter"] = Field("merged", description="train/model/: merged full "
                                                 "weights (downstream unchanged) or the adapter only.")

    @field_validator("peft_type")
    @classmethod
    def _known_peft_type(cls, v: str) -> str:
        known = peft_type_names()
        if known is not None and v.upper() not in known:
            raise ValueError(f"unknown PEFT type {v!r}; the installed peft knows {', '.join(sorted(known))}")
        return v
