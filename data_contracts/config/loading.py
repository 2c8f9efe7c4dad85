"""Load a run configuration: YAML file, ``section.field=value`` overrides, validation, one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from data_contracts.config.base import ConfigError
from data_contracts.config.run import RunConfig
from data_contracts.helpers import redact_credentials


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], (dict, list)):
                msg = f"{msg} (got {redact_credentials(repr(e['input']))})"
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {redact_credentials(repr(e['input']))})"
        parts.append(f"{loc}: {msg}")
    return "config error: " + "; ".join(parts)


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


def apply_overrides(data: dict, overrides: dict[str, Any] | list[str] | None) -> dict:
    """Apply ``{'train.lr': 1e-6}`` or ``['train.lr=1e-6']`` onto a nested dict (copied)."""
    out = json.loads(json.dumps(data))
    if not overrides:
        return out
    items = ([parse_override(o) for o in overrides] if isinstance(overrides, list)
             else [([p for p in k.split(".") if p], v) for k, v in overrides.items()])
    for path, value in items:
        node = out
        for p in path[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"config error: {'.'.join(path)}: {p} is not a section")
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return out


def load_config(path: str | os.PathLike | None = None,
                overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """Read YAML (or start from defaults), apply overrides, validate. Raises ConfigError."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config error: file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config error: {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config error: {p} must hold a mapping of sections")
    data = apply_overrides(data, overrides)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
