"""Row layouts: detect how a dataset is shaped and turn each raw row into one canonical
:class:`~data_contracts.examples.Example`. Layouts:

- ``preference``: TRL columns. Explicit (``prompt``, ``chosen``, ``rejected``) or implicit (``chosen``,
  ``rejected`` only: the prompt is their common prefix, see :func:`data_contracts.examples.split_implicit`).
  A conversational row may give the prompt as a string (one user turn); chosen/rejected that repeat
  the prompt messages first (UltraFeedback-binarized style) have them removed.
- ``openai``: OpenAI preference fine-tuning, ``input: {messages, tools?}``, ``preferred_output``,
  ``non_preferred_output`` (lists of assistant messages).
- ``sharegpt``: LLaMA-Factory, ``conversations: [{from, value}]`` + ``chosen``/``rejected``
  ``{from, value}`` (+ optional ``system``, ``tools``). ``function_call`` turns (JSON ``{name,
  arguments}`` or a list of them) become assistant ``tool_calls``; ``observation`` turns ``tool`` messages.
- ``hh``: Anthropic HH transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), parsed into messages.

Any other layout: ``DataConfig.columns`` renames source columns first (:func:`map_columns`).

Layout parsers are plain functions in LAYOUTS: a new layout is one function and one detection rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from data_contracts.errors import DataError
from data_contracts.examples import (Example, RowError, build_example, message_field, message_list,
                                     parse_tool_calls, split_implicit, text_field)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "function_call": "assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
LAYOUT_KEYS = ("chosen", "conversations", "preferred_output")


@dataclass
class Layout:
    name: str  # a key of LAYOUTS
    conversational: bool
    explicit: bool


_MISSING = object()


def _dig(row: dict, path: str) -> Any:
    node: Any = row
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def map_columns(row: Any, columns: dict[str, str] | None) -> Any:
    """Rename source columns to canonical ones: ``columns`` is ``{canonical: source}``.

    All renames happen at once (so ``{chosen: rejected, rejected: chosen}`` swaps); a source that
    names a top-level column is moved (it leaves ``meta``), a dotted one (``meta.question``) is
    copied out of a nested object. A row lacking a source column is left as is (and is then
    rejected with MISSING_FIELD by its layout parser).
    """
    if not columns or not isinstance(row, dict) or "__error__" in row:
        return row
    found = {}
    for target, src in columns.items():
        val = row[src] if src in row else (_dig(row, src) if "." in src else _MISSING)
        if val is not _MISSING:
            found[target] = val
    if not found:
        return row
    out = {k: v for k, v in row.items() if k not in columns.values()}
    out.update(found)
    return out


def detect_layout(rows: list, fmt: str = "auto") -> Layout:
    """Decide the layout from the first well-formed rows (or take the named layout ``fmt``)."""
    sample = [r for r in rows[:200] if isinstance(r, dict) and "__error__" not in r]
    if fmt not in ("auto", *LAYOUTS):
        raise DataError(f"data error: data.format={fmt!r} is unknown; use auto or one of "
                        f"{', '.join(LAYOUTS)}")
    first = next((r for r in sample if any(k in r for k in LAYOUT_KEYS)), {})
    explicit = any("prompt" in r for r in sample)
    if fmt == "openai" or (fmt == "auto" and "preferred_output" in first):
        return Layout("openai", True, True)
    if fmt == "sharegpt" or (fmt == "auto" and "conversations" in first):
        return Layout("sharegpt", True, True)
    chosen = first.get("chosen")
    if fmt == "hh" or (fmt == "auto" and not explicit and isinstance(chosen, str)
                       and chosen.startswith("\n\nHuman:")):
        return Layout("hh", True, False)
    return Layout("preference", isinstance(chosen, (list, dict)), explicit)


def _preference(row: dict, layout: Layout) -> Example:
    get = message_field if layout.conversational else text_field
    chosen, rejected = get(row, "chosen"), get(row, "rejected")
    if layout.explicit:
        if layout.conversational and isinstance(row.get("prompt"), str):
            prompt = [{"role": "user", "content": row["prompt"]}]
        else:
            prompt = get(row, "prompt")
        if layout.conversational:  # completions that repeat the prompt turns (UltraFeedback-binarized)
            n = len(prompt)
            if chosen[:n] == prompt and rejected[:n] == prompt and len(chosen) > n and len(rejected) > n:
                chosen, rejected = chosen[n:], rejected[n:]
    else:
        prompt, chosen, rejected = split_implicit(chosen, rejected)
    return build_example(prompt, chosen, rejected, layout.conversational, row, set())


def _openai(row: dict, layout: Layout) -> Example:
    inp = row.get("input")
    if inp is None:
        raise RowError("MISSING_FIELD", "input", "'input' is missing or null")
    if not isinstance(inp, dict):
        raise RowError("WRONG_TYPE", "input", f"'input' must be an object with 'messages', got "
                       f"{type(inp).__name__}")
    prompt = message_list(inp.get("messages"), "input.messages")
    chosen = message_list(row.get("preferred_output"), "preferred_output")
    rejected = message_list(row.get("non_preferred_output"), "non_preferred_output")
    extra = {f"input.{k}": v for k, v in inp.items() if k not in ("messages", "tools")}
    return build_example(prompt, chosen, rejected, True, row,
                         {"input", "preferred_output", "non_preferred_output"},
                         tools=inp.get("tools", row.get("tools")), extra_meta=extra)


def _sharegpt_messages(value: Any, key: str) -> list[dict]:
    if value is None:
        raise RowError("MISSING_FIELD", key, f"'{key}' is missing or null")
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not all(isinstance(m, dict) for m in items):
        raise RowError("WRONG_TYPE", key, f"'{key}' must be ShareGPT messages {{from, value}}")
    out = []
    for i, m in enumerate(items):
        role = SHAREGPT_ROLES.get(m["from"]) if isinstance(m.get("from"), str) else None
        if role is None:
            raise RowError("UNKNOWN_ROLE", key, f"message {i} has from={m.get('from')!r}; expected "
                           f"one of {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(m.get("value"), str):
            raise RowError("WRONG_TYPE", key, f"message {i} value must be a string")
        if m["from"] == "function_call":
            out.append({"role": "assistant", "content": "",
                        "tool_calls": parse_tool_calls(m["value"], key, i)})
        else:
            out.append({"role": role, "content": m["value"]})
    return out


def _sharegpt(row: dict, layout: Layout) -> Example:
    prompt = _sharegpt_messages(row.get("conversations"), "conversations")
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        prompt = [{"role": "system", "content": system}] + prompt
    chosen = _sharegpt_messages(row.get("chosen"), "chosen")
    rejected = _sharegpt_messages(row.get("rejected"), "rejected")
    return build_example(prompt, chosen, rejected, True, row, {"conversations", "system"})


def parse_hh(text: str, key: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> [{user: a}, {assistant: b}]."""
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError("UNPARSEABLE", key, "not an HH transcript (must start with '\\n\\nHuman:')")
    role = {"Human": "user", "Assistant": "assistant"}
    return [{"role": role[r], "content": c} for r, c in zip(parts[1::2], parts[2::2])]


def _hh(row: dict, layout: Layout) -> Example:
    chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
    prompt, chosen, rejected = split_implicit(parse_hh(chosen, "chosen"), parse_hh(rejected, "rejected"))
    return build_example(prompt, chosen, rejected, True, row, set())


LAYOUTS: dict[str, Callable[[dict, Layout], Example]] = {
    "preference": _preference, "openai": _openai, "sharegpt": _sharegpt, "hh": _hh,
}


def to_example(row: Any, layout: Layout) -> Example:
    """One raw row -> Example, or RowError. Never any other exception for a malformed row."""
    if not isinstance(row, dict):
        raise RowError("WRONG_TYPE", "<row>", f"row must be an object, got {type(row).__name__}")
    if "__error__" in row:
        raise RowError(row.get("__code__", "BAD_JSON"), "<row>", row["__error__"])
    return LAYOUTS[layout.name](row, layout)
