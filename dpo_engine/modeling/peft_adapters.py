"""PEFT adapters: build one from the run config, continue a saved one, export merged or adapter-only.

With ``reference.source: adapter_disabled`` the reference log-probs come from the policy itself with
its adapter switched off (``reference_mode``): one model in memory, no cache. peft is imported inside
the functions that build or load an adapter: its import takes seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

from data_contracts.config import ConfigError, PeftConfig, RunConfig
from dpo_engine.modeling.loading import LOAD_LOCK, ModelError, save_model_folder, seeded
from dpo_engine.modeling.logps import unwrap_model

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_peft(model: nn.Module) -> bool:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    peft = sys.modules.get("peft")  # not imported: no PeftModel exists (and `import peft` takes seconds)
    return peft is not None and isinstance(model, peft.PeftModel)


def check_config(cfg: RunConfig) -> None:
    """Cross-section checks of the adapter settings (raise ConfigError)."""
    if cfg.reference.source == "adapter_disabled" and not cfg.peft.enabled:
        raise ConfigError("config error: reference.source=adapter_disabled needs peft.enabled=true "
                          "(without an adapter there is nothing to disable)")
    if cfg.peft.adapter_path and not cfg.peft.enabled:
        raise ConfigError("config error: peft.adapter_path is set but peft.enabled is false")
    if cfg.peft.adapter_path and not (Path(cfg.peft.adapter_path).expanduser() / "adapter_config.json").is_file():
        raise ConfigError(f"config error: peft.adapter_path: no adapter_config.json in {cfg.peft.adapter_path}")
    if cfg.peft.adapter_path and (problem := adapter_weights_problem(Path(cfg.peft.adapter_path).expanduser())):
        raise ConfigError(f"config error: peft.adapter_path: {problem}")


def adapter_weights_problem(folder: Path) -> str | None:
    """Safetensors only: why the adapter folder ``folder`` cannot be continued (its weights are
    pickles, e.g. adapter_model.bin, or missing), or None."""
    if (folder / ADAPTER_WEIGHTS).is_file():
        return None
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        return (f"adapter folder {folder} holds only pickle weights ({', '.join(pickles[:3])}); only safetensors "
                f"are loaded: convert them to {ADAPTER_WEIGHTS} (save_pretrained with safe_serialization=True) first")
    return f"adapter folder {folder} has no {ADAPTER_WEIGHTS}"


def peft_config(cfg: PeftConfig):
    """The peft config object: LoRA fields for LORA, then ``extra`` passed through as is."""
    from peft import get_peft_config

    kw: dict = {"peft_type": cfg.peft_type.upper(), "task_type": "CAUSAL_LM"}
    if cfg.target_modules is not None:
        kw["target_modules"] = cfg.target_modules
    if cfg.modules_to_save is not None:
        kw["modules_to_save"] = cfg.modules_to_save
    if kw["peft_type"] == "LORA":
        kw.update(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)
    kw.update(cfg.extra)
    try:
        return get_peft_config(kw)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"config error: peft: {e}") from None


def apply_adapter(model: nn.Module, cfg: PeftConfig, seed: int = 0) -> nn.Module:
    """Wrap ``model`` in a trainable PeftModel: the saved adapter at ``cfg.adapter_path`` (continued),
    or a fresh one built from ``cfg``, initialised from ``seed`` (the run's train.seed). Only adapter
    parameters require grad afterwards. A saved adapter is read from adapter_model.safetensors only
    (a folder with pickle weights alone is refused: ModelError)."""
    from peft import PeftModel, get_peft_model

    if cfg.adapter_path:
        folder = Path(cfg.adapter_path).expanduser()
        problem = adapter_weights_problem(folder)
        if problem:
            raise ModelError(problem)
        try:  # peft reads adapter_model.safetensors when it is there, the pickle only without it
            with LOAD_LOCK:
                return PeftModel.from_pretrained(model, str(folder), is_trainable=True, use_safetensors=True)
        except Exception as e:
            if type(e).__name__ != "SafetensorError":
                raise
            text = str(e).strip()
            raise ModelError(f"cannot load adapter {folder}: {folder / ADAPTER_WEIGHTS} is corrupted "
                             f"({text.splitlines()[0] if text else type(e).__name__})") from None
    with seeded(seed):
        return get_peft_model(model, peft_config(cfg))


def reference_mode(model: nn.Module):
    """Context in which ``model`` computes the reference: its adapter disabled."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if not is_peft(model):
        raise TypeError("reference log-probs from the adapter-disabled policy need a PeftModel")
    return model.disable_adapter()


def export_model(model: nn.Module, tokenizer, dest: Path, export: str = "merged",
                 base_model_path: str | None = None) -> Path:
    """Write the trained model to ``dest``: merged full weights (a plain model folder, so every
    downstream consumer is unchanged) or the adapter only (adapter_config.json pointing at
    ``base_model_path``). A non-PEFT model is saved as is."""
    if not is_peft(model):
        return save_model_folder(unwrap_model(model), tokenizer, dest)
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if export == "merged":
        return save_model_folder(model.merge_and_unload(), tokenizer, dest)
    if base_model_path:
        for c in model.peft_config.values():
            c.base_model_name_or_path = base_model_path
    return save_model_folder(model, tokenizer, dest)

