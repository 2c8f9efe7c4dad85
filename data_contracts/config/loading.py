"""Load a run configuration: YAML file, ``section.field=value`` overrides, validation, one-line errors."""

from __future__ import annotations

import json
import os
from typing import Any

import yaml

from data_contracts.config.base import ConfigError
from data_contracts.config.run import RunConfig, validate
from data_contracts.config.trl import detect_form, print_notes, read_mapping, translate_trl


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.learning_rate=1e-6`` -> (['train', 'learning_rate'], 1e-06). Values are YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"config error: override {item!r} must look like section.field=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"config error: override {item!r} has an empty field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return path, value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-6", "data.eval_source=null"]`` -> ``{"train.lr": 1e-06, "data.eval_source": None}``:
    the CLI's ``--set`` items parsed once (YAML values), so every later step sees typed values."""
    return {".".join(path): value for path, value in map(parse_override, items)}


def _items(overrides: dict[str, Any] | list[str] | None) -> list[tuple[list[str], Any]]:
    if not overrides:
        return []
    return ([parse_override(o) for o in overrides] if isinstance(overrides, list)
            else [([p for p in k.split(".") if p], v) for k, v in overrides.items()])


def apply_overrides(data: dict, overrides: dict[str, Any] | list[str] | None) -> dict:
    """Apply ``{'train.lr': 1e-6}`` or ``['train.lr=1e-6']`` onto a nested dict (copied)."""
    out = json.loads(json.dumps(data))
    for path, value in _items(overrides):
        node = out
        for p in path[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"config error: {'.'.join(path)}: {p} is not a section")
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


def load_config(path: str | os.PathLike | None = None,
                overrides: dict[str, Any] | list[str] | None = None, trl: bool | None = None) -> RunConfig:
    """Read YAML (or start from defaults), apply overrides, validate. Raises ConfigError.

    ``trl``: True reads the file as a TRL ``DPOConfig``/``trl dpo`` file (flat TRL names,
    :mod:`data_contracts.config.trl`); None (default) does so when the file is one (no top-level key
    is one of our sections and TRL names are there), saying so on stderr with the translation's
    notes; False never. Overrides use our names and apply after the translation."""
    data: dict = {}
    origin: dict[str, str] = {}
    if path is not None:
        data = read_mapping(path)
        form = detect_form(data, str(path)) if trl is not False else "ours"
        if trl and form != "trl":
            raise ConfigError(f"config error: {path} is not a TRL file: it has our own sections or no TRL "
                              "name at the top level; give it as --config")
        if form == "trl":
            t = translate_trl(data, str(path))
            print_notes([f"{path}: read as a TRL DPOConfig / `trl dpo` file (flat TRL names, none of our "
                         f"sections); `dpo config from-trl {path}` prints the translation", *t.notes])
            data, origin = t.config, t.origin
    data = apply_overrides(data, overrides)
    if origin:  # a field an override set is named as ours
        keys = {".".join(p) for p, _ in _items(overrides)}
        origin = {f: k for f, k in origin.items() if not any(f == o or f.startswith(o + ".") for o in keys)}
    return validate(data, origin)
