"""A config as YAML with each field's description above it as a comment (``dpo config show``): the
pydantic descriptions of :mod:`data_contracts.config` in a file that loads back as the same config."""

from __future__ import annotations

import textwrap
from typing import Any

import yaml
from pydantic import BaseModel


def _value(model: BaseModel, name: str) -> Any:
    """A field's value as YAML writes it (enums and paths as strings), also for a field excluded from
    dumps (``data.num_proc``)."""
    return type(model).__pydantic_serializer__.to_python(model, mode="json", include={name}).get(
        name, getattr(model, name))


def _emit(model: BaseModel, indent: int, width: int, out: list[str]) -> None:
    pad = "  " * indent
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if info.description:
            lines = textwrap.wrap(info.description, max(40, width - len(pad) - 2), break_on_hyphens=False)
            out += [f"{pad}# {line}" for line in lines]
        if isinstance(value, BaseModel):
            out.append(f"{pad}{name}:")
            _emit(value, indent + 1, width, out)
            continue
        text = yaml.safe_dump(_value(model, name), default_flow_style=True, sort_keys=False, width=10**6,
                              allow_unicode=True)  # one line: a scalar, or a flow-style list or mapping
        out.append(f"{pad}{name}: {text.removesuffix(chr(10)).removesuffix(chr(10) + '...')}")


def commented_yaml(cfg: BaseModel, width: int = 100) -> str:
    """Every field of ``cfg`` (nested sections indented), each under its description as ``# ...`` lines."""
    out: list[str] = []
    _emit(cfg, 0, width, out)
    return "\n".join(out) + "\n"
