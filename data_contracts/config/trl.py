"""Bring a TRL config: a ``trl dpo --config`` YAML (TRL's flat names of ``DPOConfig``, transformers'
``TrainingArguments``, ``ScriptArguments`` and ``ModelConfig``) translated into our nested run config.

Every name is accounted for (:mod:`data_contracts.config.trl_names`, the one table): it maps to one of
our fields, or is accepted as having no effect here and printed with the reason, or is refused by name
with the reason. A name TRL does not have is refused. Values are then validated by our config, and an
error names the TRL key it came from. Where TRL's default changes what is trained and ours differs
(``num_train_epochs`` 3; with ``use_peft``, ``lora_dropout`` 0.05 and peft's default target modules),
the file gets TRL's default, and the notes say so; defaults that only change speed or memory keep ours
and are noted.

Python: ``from_trl(path_or_mapping) -> dict`` (our nested config, validated; notes on stderr),
``translate_trl(mapping) -> Translation`` (the same, unvalidated and silent), and
``load_config(path, overrides, trl=True)``, which also detects a TRL file by itself.
"""

from __future__ import annotations

import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from data_contracts.config.base import ConfigError
from data_contracts.config.run import validate
from data_contracts.config.train import OptimizerName
from data_contracts.config.trl_names import CONVERTED, FIELDS, IGNORED, KNOWN, NOOP_ONLY

# our top-level sections: a file with one of them is in our nested form, never TRL's
OUR_SECTIONS = frozenset({"data", "model", "reference", "peft", "loss", "train", "eval", "registry", "tracking"})
ALIASES = {"torch_dtype": "dtype", "evaluation_strategy": "eval_strategy"}  # older names TRL files still use
OPTIMIZERS = typing.get_args(OptimizerName)
DATA_EXTS = (".jsonl", ".json", ".parquet", ".csv")


@dataclass
class Translation:
    """A TRL file in our terms: ``config`` (nested, only what the file decides), ``notes`` (the lines
    to print: what was ignored and why, the TRL defaults applied) and ``origin`` (our dotted field ->
    the TRL key it came from, for error messages)."""

    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    origin: dict[str, str] = field(default_factory=dict)

    def set(self, path: str, value: Any, key: str) -> None:
        node = self.config
        *parents, last = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
        self.origin[path] = key


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (bool, type(None), list, dict)) else str(value)


def detect_form(data: Mapping, where: str) -> str:
    """``"trl"`` when no top-level key is one of our sections and TRL names are there (``run_name``
    alone decides nothing), else ``"ours"``; a file with both forms at the top level is an error."""
    keys = set(data)
    trl = sorted((keys - {"run_name"}) & (KNOWN | set(ALIASES)))
    ours = sorted(keys & OUR_SECTIONS)
    if trl and ours:
        raise ConfigError(f"config error: {where} mixes our sections ({', '.join(ours)}) with TRL names at the "
                          f"top level ({', '.join(trl[:6])}); write either our nested form or a flat TRL file")
    return "trl" if trl else "ours"


def _whole(value: Any, key: str) -> int:
    """A step count: TRL also takes a float below 1 (a ratio of the run's steps), which needs the step
    count we only know when training starts."""
    if isinstance(value, float) and 0 < value < 1:
        raise ConfigError(f"config error: TRL {key}={value}: a ratio of the run's steps is not supported; "
                          "give a whole number of steps")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _json(value: Any, key: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise ConfigError(f"config error: TRL {key}: {value!r} is not a JSON mapping") from None


def _refuse(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config error: TRL {key}={_show(value)} is not supported here: {why}")


def _split_file(folder: Path, split: str) -> Path | None:
    """``<split>.jsonl`` (or .json/.parquet/.csv, optionally .gz) in a local dataset folder, as
    ``datasets.load_dataset`` names a folder's splits; several shards of a split are refused."""
    found = [p for p in sorted(folder.iterdir()) if p.is_file() and
             any(p.name in (split + e, split + e + ".gz") for e in DATA_EXTS)]
    shards = [p for p in folder.iterdir() if p.name.startswith(split + "-")]
    if shards and not found:
        raise ConfigError(f"config error: TRL dataset_name={folder}: split {split!r} is in {len(shards)} shard "
                          f"files; point dataset_name at a folder holding only that split's files")
    return found[0] if found else None


def _data(d: Mapping, t: Translation) -> None:
    name, cfg_name = d.get("dataset_name"), d.get("dataset_config")
    train, test = d.get("dataset_train_split", "train"), d.get("dataset_test_split")
    if cfg_name is not None:
        raise _refuse("dataset_config", cfg_name, "data.source has no hub configuration name; save that "
                      "configuration's split to a file and give its path as dataset_name")
    if name is None:
        if "dataset_train_split" in d or test is not None:
            raise ConfigError("config error: TRL dataset_train_split/dataset_test_split need dataset_name")
        return
    if str(name).startswith("builtin:"):
        if train != "train" or test not in (None, "test", "eval"):
            raise ConfigError(f"config error: TRL dataset_name={name}: its splits are train and eval (got "
                              f"dataset_train_split={train}, dataset_test_split={test})")
        t.set("data.source", name, "dataset_name")
        return
    path = Path(name).expanduser()
    if str(name).startswith((".", "/", "~")) or path.exists():  # a local file or folder
        tr = _split_file(path, train) if path.is_dir() else None
        te = _split_file(path, test or "test") if path.is_dir() else None
        if tr is None and (train != "train" or te is not None):
            raise ConfigError(f"config error: TRL dataset_name={name}: no {train!r} split file in it (a local "
                              f"file is one train split; a folder's splits are its <split>.jsonl/.parquet/... "
                              f"files)")
        if test is not None and te is None:
            raise ConfigError(f"config error: TRL dataset_test_split={test}: {name} has no {test!r} split file; "
                              "leave it unset to hold out data.eval_fraction of the train data")
        t.set("data.source", str(tr or name), "dataset_name")
        if te is not None:
            t.set("data.eval_source", str(te), "dataset_test_split")
    else:  # a hub dataset id: owner/name@split
        t.set("data.source", f"{name}@{train}", "dataset_name")
        if test is not None or d.get("eval_strategy", "no") != "no":
            t.set("data.eval_source", f"{name}@{test or 'test'}", "dataset_test_split")
    if "data" not in t.config or "eval_source" not in t.config["data"]:
        t.notes.append("no dataset_test_split: data.eval_fraction (default 0.05) of the train data is held "
                       "out for the evaluate stage")


def _dtype(value: Any, key: str, t: Translation) -> None:
    if value is None:
        return
    name = str(value).removeprefix("torch.")
    if name == "auto":  # transformers' auto: the checkpoint's dtype (ours, model.dtype auto, is float32)
        t.set("model.init_kwargs.dtype", "auto", key)
    elif name in ("float32", "bfloat16", "float16"):
        t.set("model.dtype", name, key)
    else:
        raise _refuse(key, value, "use auto, float32, bfloat16 or float16")


def _model(d: Mapping, t: Translation) -> None:
    if d.get("model_revision") not in (None, "main"):
        t.set("model.revision", d["model_revision"], "model_revision")
    _dtype(d.get("dtype"), "dtype", t)
    if d.get("lora_task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise _refuse("lora_task_type", d["lora_task_type"], "only causal language models are trained")
    if "lora_target_modules" in d:
        mods = d["lora_target_modules"]
        t.set("peft.target_modules", mods[0] if isinstance(mods, list) and len(mods) == 1 else mods,
              "lora_target_modules")
    kw = dict(_json(d.get("model_init_kwargs"), "model_init_kwargs") or {})
    if not isinstance(kw, dict):
        raise ConfigError("config error: TRL model_init_kwargs must be a mapping")
    for k in ("torch_dtype", "dtype"):
        if k in kw:
            _dtype(kw.pop(k), f"model_init_kwargs.{k}", t)
    if "quantization_config" in kw:
        raise _refuse("model_init_kwargs.quantization_config", "...", "quantized base models are not supported")
    for k, path in (("revision", "model.revision"), ("trust_remote_code", "model.trust_remote_code")):
        if k in kw:
            t.set(path, kw.pop(k), f"model_init_kwargs.{k}")
    for k, v in kw.items():
        t.set(f"model.init_kwargs.{k}", v, f"model_init_kwargs.{k}")


def _loss(d: Mapping, t: Translation) -> None:
    lt = d.get("loss_type")
    types = None if lt is None else [lt] if isinstance(lt, str) else list(lt)
    alpha = d.get("rpo_alpha")
    if alpha is not None:  # RPO: the DPO loss + alpha * NLL of the chosen completions
        types = types or ["sigmoid"]
        weights = list(d.get("loss_weights") or [1.0] * len(types))
        if "sft" in types or len(weights) != len(types):
            raise _refuse("rpo_alpha", alpha, "with 'sft' already in loss_type or loss_weights of another "
                          "length; write loss_type [..., sft] and loss_weights yourself")
        types = types + ["sft"]
        t.set("loss.loss_weights", weights + [alpha], "rpo_alpha")
        t.notes.append(f"rpo_alpha={alpha}: loss_type {types} with loss_weights {weights + [alpha]} (RPO)")
    if types is not None:
        t.set("loss.loss_type", types[0] if len(types) == 1 else types, "loss_type")


def _reference(d: Mapping, t: Translation) -> None:
    pre, sync = d.get("precompute_ref_log_probs"), d.get("sync_ref_model")
    if sync and pre:
        raise _refuse("precompute_ref_log_probs", pre, "sync_ref_model moves the reference during training "
                      "(TRL refuses this pair too)")
    if sync:
        t.set("reference.source", "model", "sync_ref_model")
    elif pre:
        t.set("reference.source", "precomputed", "precompute_ref_log_probs")
    elif pre is False:
        t.notes.append("precompute_ref_log_probs=false: the reference log-probs are still precomputed, once "
                       "(the same values as TRL's online frozen reference, without a second model in memory); "
                       "--set reference.source=model for an online one")


def _train(d: Mapping, t: Translation) -> None:
    bf, fp = d.get("bf16"), d.get("fp16")
    if bf and fp:
        raise _refuse("fp16", fp, "bf16 and fp16 are both true; choose one")
    if fp:
        t.set("train.precision", "fp16", "fp16")
    elif bf:
        t.set("train.precision", "bf16", "bf16")
    elif bf is False:
        t.set("train.precision", "fp32", "bf16")
    for key in ("gradient_checkpointing", "activation_checkpointing"):
        if d.get(key) is not None:
            t.set("train.gradient_checkpointing", d[key], key)
    if d.get("lr_scheduler_kwargs") is not None:
        t.set("train.lr_scheduler_kwargs", _json(d["lr_scheduler_kwargs"], "lr_scheduler_kwargs"),
              "lr_scheduler_kwargs")
    ws = d.get("warmup_steps") or 0
    if 0 < ws < 1:
        t.set("train.warmup_ratio", ws, "warmup_steps")
    elif ws >= 1:
        t.set("train.warmup_steps", int(ws), "warmup_steps")
    if "optim" in d:
        if d["optim"] not in OPTIMIZERS:
            raise _refuse("optim", d["optim"], f"the engine builds {', '.join(OPTIMIZERS)}")
        t.set("train.optim", d["optim"], "optim")
    if d.get("max_length", 0) is None:
        raise _refuse("max_length", None, "sequences are always truncated here; give a number (TRL's 1024)")
    if "max_length" in d:
        t.set("data.max_length", d["max_length"], "max_length")
    p2 = d.get("pad_to_multiple_of")
    if p2 not in (None, "auto", "none", "null"):
        t.set("train.pad_to_multiple_of", int(p2) if isinstance(p2, str) and p2.isdigit() else p2,
              "pad_to_multiple_of")
    _cadence(d, t)


def _cadence(d: Mapping, t: Translation) -> None:
    """Evaluation, checkpoint and logging intervals."""
    strategy = d.get("eval_strategy", "no")
    if strategy == "steps":
        key = "eval_steps" if d.get("eval_steps") is not None else "logging_steps"
        t.set("train.eval_steps", _whole(d.get(key, 10), key), key)
    elif strategy != "no":
        raise _refuse("eval_strategy", strategy, "periodic evaluation is every eval_steps steps (eval_strategy "
                      "steps); the evaluate stage runs at the end anyway")
    elif d.get("eval_steps") is not None:
        t.notes.append("eval_steps ignored: eval_strategy is no (as in transformers)")
    save = d.get("save_strategy", "steps")
    if save == "no":
        t.set("train.save_steps", 0, "save_strategy")
        t.notes.append("save_strategy=no: no periodic checkpoints; the final one is still written")
    elif save != "steps":
        raise _refuse("save_strategy", save, "checkpoints are every save_steps steps (save_strategy steps)")
    elif d.get("save_steps") is not None:
        t.set("train.save_steps", _whole(d["save_steps"], "save_steps"), "save_steps")
    if d.get("save_total_limit") is not None:
        t.set("train.save_total_limit", d["save_total_limit"], "save_total_limit")
    if d.get("logging_strategy", "steps") != "steps":
        raise _refuse("logging_strategy", d["logging_strategy"], "metrics go to MLflow every logging_steps "
                      "steps (and every step to train/history.json)")
    if d.get("logging_steps") is not None:
        t.set("train.logging_steps", _whole(d["logging_steps"], "logging_steps"), "logging_steps")


def _trl_defaults(d: Mapping, t: Translation) -> None:
    """TRL's defaults where ours differ: applied where they change what is trained, noted otherwise."""
    applied = []
    if d.get("max_steps", -1) in (-1, None) and "num_train_epochs" not in d:
        t.set("train.num_train_epochs", 3.0, "num_train_epochs")
        applied.append("num_train_epochs=3")
    if d.get("use_peft"):
        if "lora_dropout" not in d:
            t.set("peft.lora_dropout", 0.05, "lora_dropout")
            applied.append("lora_dropout=0.05")
        if "lora_target_modules" not in d:
            t.set("peft.target_modules", None, "lora_target_modules")
            applied.append("lora_target_modules=null (peft's default for the architecture)")
    if applied:
        t.notes.append("TRL defaults applied (not in the file): " + ", ".join(applied))
    kept = []
    if d.get("gradient_checkpointing") is None and d.get("activation_checkpointing") is None:
        kept.append("gradient_checkpointing false (TRL: true; the fused head keeps the logits out of memory)")
    if d.get("bf16") is None and not d.get("fp16"):
        kept.append("train.precision auto (TRL: bf16; here bf16 autocast on CUDA, fp32 on the CPU)")
    if kept:
        t.notes.append("our defaults kept (speed and memory only): " + "; ".join(kept))


def translate_trl(mapping: Mapping, where: str = "the TRL config") -> Translation:
    """A flat TRL mapping in our nested form (not validated, nothing printed). Raises ConfigError naming
    the TRL key for a name TRL does not have or a value that cannot be honoured here."""
    d = dict(mapping)
    t = Translation()
    for old, new in ALIASES.items():
        if old in d:
            if new in d:
                raise ConfigError(f"config error: {where} has both {old} and {new} (the older name of it)")
            d[new] = d.pop(old)
            t.notes.append(f"{old}: read as {new} (its newer name)")
    unknown = sorted(k for k in d if k not in KNOWN)
    if unknown:
        raise ConfigError(f"config error: {where}: {', '.join(map(str, unknown))}: not a name of TRL 1.16's "
                          "DPOConfig (transformers' TrainingArguments), ScriptArguments or ModelConfig, nor "
                          "one this pipeline knows; remove it (our own fields: dpo config show --defaults)")
    refused = [f"{k}={_show(v)} ({NOOP_ONLY[k][1]})" for k, v in d.items()
               if k in NOOP_ONLY and v not in NOOP_ONLY[k][0]]
    if refused:
        raise ConfigError(f"config error: {where}: not supported here: " + "; ".join(refused))
    for k, path in FIELDS.items():
        if d.get(k) is not None and not (path.startswith("peft.extra.") and d[k] is False):
            t.set(path, d[k], k)
    _data(d, t)
    _model(d, t)
    _loss(d, t)
    _reference(d, t)
    _train(d, t)
    _trl_defaults(d, t)
    for k in (k for k in d if k in IGNORED):
        t.notes.append(f"ignored: {k}: {IGNORED[k]}")
    noop = [f"{k}={_show(d[k])}" for k in d if k in NOOP_ONLY]
    if noop:
        t.notes.append("ignored at a value that does nothing: " + ", ".join(noop))
    placed = {key.split(".")[0] for key in t.origin.values()}
    for k in d:  # read, but no field came from it alone (e.g. eval_strategy steps, dataset_train_split)
        if k not in placed and k not in IGNORED and k not in NOOP_ONLY:
            t.notes.append(f"read: {k}={_show(d[k])}: {CONVERTED.get(k, FIELDS.get(k))}")
    return t


def read_mapping(path: str | Path) -> dict:
    """A YAML file's top-level mapping (ConfigError naming the file otherwise)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config error: file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config error: {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {p} must hold a mapping of sections (or of TRL names)")
    return data


def print_notes(notes: list[str], stream=None) -> None:
    for n in notes:
        print(f"trl config: {n}", file=stream or sys.stderr)


def from_trl(src: str | Path | Mapping, *, echo: bool = True) -> dict:
    """A TRL file (path) or mapping -> our nested config dict, validated by our config (an error names
    the TRL key); the notes (what was ignored and why, TRL defaults applied) go to stderr unless
    ``echo`` is false."""
    where = str(src) if not isinstance(src, Mapping) else "the TRL config"
    data = read_mapping(src) if not isinstance(src, Mapping) else src
    if detect_form(data, where) != "trl":
        raise ConfigError(f"config error: {where} is not a TRL file: it has our own sections or no TRL name "
                          "at the top level; give it as --config")
    t = translate_trl(data, where)
    validate(t.config, t.origin)
    if echo:
        print_notes(t.notes)
    return t.config
