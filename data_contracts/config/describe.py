"""A config as YAML with each field's description above it as a comment (``dpo config show``): the
pydantic descriptions of :mod:`data_contracts.config` in a file that loads back as the same config."""

from __future__ import annotations

import textwrap
import typing
from typing import Any

import yaml
from pydantic import BaseModel


def _value(model: BaseModel, name: str) -> Any:
    """A field's value as YAML writes it (enums and paths as strings), also for a field excluded from
    dumps (``data.num_proc``)."""
    return type(model).__pydantic_serializer__.to_python(model, mode="json", include={name}).get(
        name, getattr(model, name))


def _comment(text: str, pad: str, width: int, out: list[str]) -> None:
    lines = textwrap.wrap(text, max(40, width - len(pad) - 2), break_on_hyphens=False)
    out += [f"{pad}# {line}" for line in lines]


def _section_values(annotation: Any) -> type[BaseModel] | None:
    """The section type of a ``dict[str, <Section>]`` field (``eval.sets``), else None."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is dict and len(args) == 2 and isinstance(args[1], type) \
            and issubclass(args[1], BaseModel):
        return args[1]
    return None


def _emit(model: BaseModel, indent: int, width: int, out: list[str]) -> None:
    pad = "  " * indent
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if info.description:
            _comment(info.description, pad, width, out)
        if isinstance(value, BaseModel):
            out.append(f"{pad}{name}:")
            _emit(value, indent + 1, width, out)
            continue
        entry = _section_values(info.annotation)
        if entry is not None:  # a mapping of sections: each entry's fields under their descriptions
            if not value:  # none set: what an entry's fields are, as comments
                out.append(f"{pad}{name}: {{}}")
                for field, sub in entry.model_fields.items():
                    _comment(f"<name>.{field}: {sub.description or ''}", pad + "  ", width, out)
                continue
            out.append(f"{pad}{name}:")
            for key, sub in value.items():
                out.append(f"{pad}  {key}:")
                _emit(sub, indent + 2, width, out)
            continue
        text = yaml.safe_dump(_value(model, name), default_flow_style=True, sort_keys=False, width=10**6,
                              allow_unicode=True)  # one line: a scalar, or a flow-style list or mapping
        out.append(f"{pad}{name}: {text.removesuffix(chr(10)).removesuffix(chr(10) + '...')}")


def commented_yaml(cfg: BaseModel, width: int = 100) -> str:
    """Every field of ``cfg`` (nested sections indented), each under its description as ``# ...`` lines."""
    out: list[str] = []
    _emit(cfg, 0, width, out)
    return "\n".join(out) + "\n"
