"""Mixture-of-experts routers: which models have one, and ``train.router_aux_loss_coef`` resolved
against them.

transformers' MoE causal LMs (Mixtral, Qwen2/3-MoE, OLMoE, GPT-OSS, ... 31 in 5.24) return each MoE
layer's router logits from their decoder body when called with ``output_router_logits=True``, and
their ``*ForCausalLM.forward`` adds ``router_aux_loss_coef * load_balancing_loss_func(router_logits,
num_experts, num_experts_per_tok, attention_mask)`` (Switch Transformer's load-balancing loss) to the
LM loss. The engine does not rewrite that function: :class:`Router` holds the one from the model's own
module, with the model's expert count and top-k, and ``dpo_engine.training.router_aux`` calls it.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from data_contracts.config import BUILTIN_MODEL, BUILTIN_MOE_MODEL, ConfigError, RunConfig
from dpo_engine.modeling.logps import unwrap_model

FIELD = "train.router_aux_loss_coef"
# what the builtin models are, known without building them (preflight must not convert a model)
BUILTIN_ARCHITECTURES = {BUILTIN_MODEL: "LlamaForCausalLM", BUILTIN_MOE_MODEL: "Qwen3MoeForCausalLM"}


@dataclass(frozen=True)
class Router:
    """A causal LM's routers: its module's ``load_balancing_loss_func``, expert count, top-k, and the
    coefficient its config gives the auxiliary loss."""

    loss_fn: Callable
    num_experts: int
    top_k: int
    config_coef: float


def has_router(cls: type) -> bool:
    """Whether causal-LM class ``cls`` computes transformers' router auxiliary loss: its forward
    takes ``output_router_logits`` and its module defines ``load_balancing_loss_func``."""
    module = sys.modules.get(getattr(cls, "__module__", ""))
    forward = getattr(cls, "forward", None)
    return (callable(getattr(module, "load_balancing_loss_func", None)) and forward is not None
            and "output_router_logits" in inspect.signature(forward).parameters)


def router_of(model: nn.Module) -> Router | None:
    """The routers of ``model`` (also through PEFT/DDP wrappers), or None for a model without any
    (a dense model; an MoE class configured with a single expert)."""
    lm = unwrap_model(model)
    if not has_router(type(lm)):
        return None
    experts = _setting(lm, "num_experts", "num_local_experts")
    top_k = _setting(lm, "num_experts_per_tok")
    if not experts or not top_k or experts < 2:
        return None
    return Router(sys.modules[type(lm).__module__].load_balancing_loss_func, int(experts), int(top_k),
                  float(_setting(lm, "router_aux_loss_coef") or 0.0))


def _setting(lm: nn.Module, *names: str):
    """The first of ``names`` set on the model (as its forward reads them), its config, or its text
    config (a vision-language MoE)."""
    for owner in (lm, lm.config, getattr(lm.config, "text_config", None)):
        for name in names:
            value = getattr(owner, name, None)
            if value is not None and not isinstance(value, nn.Module):
                return value
    return None


def aux_loss_coef(setting: float | None, model: nn.Module) -> float:
    """``train.router_aux_loss_coef`` for ``model`` (TRL's meaning): unset, the model config's
    ``router_aux_loss_coef`` (0 without a router); set, that value (0: off). A value for a model
    without a router raises ConfigError naming the field and the model."""
    router = router_of(model)
    if router is None:
        if setting is not None:
            lm = unwrap_model(model)
            raise ConfigError(no_router_message(setting, getattr(lm.config, "_name_or_path", "") or "the model",
                                                type(lm).__name__))
        return 0.0
    return router.config_coef if setting is None else float(setting)


def no_router_message(setting: float, name: str, cls: str) -> str:
    return (f"config error: {FIELD}={setting}: model {name} ({cls}) has no mixture-of-experts router, "
            f"so there is no router auxiliary loss; unset {FIELD}")


def check_router_setting(cfg: RunConfig) -> None:
    """Preflight: ``train.router_aux_loss_coef`` set for a model whose class has no router is a config
    error before any compute. The class comes from the builtin table, a local folder's config.json or a
    hub id's cached config.json (nothing is downloaded); a class not known to transformers (remote code)
    or not found is left to the check at load time (:func:`aux_loss_coef`)."""
    setting = cfg.train.router_aux_loss_coef
    if setting is None:
        return
    name = cfg.model.name_or_path
    arch = _architecture(name, cfg.model.revision)
    if arch is None:
        return
    import transformers

    cls = getattr(transformers, arch, None)
    if cls is not None and not has_router(cls):
        raise ConfigError(no_router_message(setting, name, arch))


def _architecture(name: str, revision: str | None) -> str | None:
    if name in BUILTIN_ARCHITECTURES:
        return BUILTIN_ARCHITECTURES[name]
    config = Path(name).expanduser() / "config.json"
    if not config.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json", revision=revision)
        except ValueError:  # not a repo id
            return None
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return None
    return archs[0] if archs and isinstance(archs[0], str) else None
