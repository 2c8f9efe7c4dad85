"""Row layouts: detect how a dataset is shaped and turn each raw row into one canonical Example.

Canonical form (TRL's): ``prompt``, ``chosen``, ``rejected`` are all strings ("standard") or all
lists of ``{"role", "content"}`` messages ("conversational"); the prompt is explicit. Layouts:

- ``preference``: TRL columns. Explicit (``prompt``, ``chosen``, ``rejected``) or implicit (``chosen``,
  ``rejected`` only: the prompt is their common prefix, see :func:`split_implicit`).
- ``sharegpt``: LLaMA-Factory, ``conversations: [{from, value}]`` + ``chosen``/``rejected``
  ``{from, value}`` (+ optional ``system``, ``tools``).
- ``hh``: Anthropic HH transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), parsed into messages.

A bad row raises :class:`RowError` (code, field, message); the caller records it and goes on.
Adapters are plain functions in ADAPTERS: a new layout is one function and one detection rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "function_call": "assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


class RowError(Exception):
    def __init__(self, code: str, field: str, message: str):
        super().__init__(message)
        self.code, self.field, self.message = code, field, message


@dataclass
class Layout:
    name: str  # a key of ADAPTERS
    conversational: bool
    explicit: bool


@dataclass
class Example:
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    is_conversational: bool
    tools: list | None = None
    meta: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------- detection

def detect_layout(rows: list, fmt: str = "auto") -> Layout:
    """Decide the layout from the first well-formed rows (or take the named adapter ``fmt``)."""
    sample = [r for r in rows[:200] if isinstance(r, dict) and "__error__" not in r]
    if fmt not in ("auto", *ADAPTERS):
        from data_contracts.errors import DataError
        raise DataError(f"data error: data.format={fmt!r} is unknown; use auto or one of "
                        f"{', '.join(ADAPTERS)}")
    first = next((r for r in sample if "chosen" in r or "conversations" in r), {})
    explicit = any("prompt" in r for r in sample)
    if fmt == "sharegpt" or (fmt == "auto" and "conversations" in first):
        return Layout("sharegpt", True, True)
    chosen = first.get("chosen")
    if fmt == "hh" or (fmt == "auto" and not explicit and isinstance(chosen, str)
                       and chosen.startswith("\n\nHuman:")):
        return Layout("hh", True, False)
    return Layout("preference", isinstance(chosen, (list, dict)), explicit)


# ------------------------------------------------------------------------------------- checks

def _text(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        raise RowError("MISSING_FIELD", key, f"'{key}' is missing or null")
    if not isinstance(v, str):
        raise RowError("WRONG_TYPE", key, f"'{key}' must be a string, got {type(v).__name__}")
    return v


def _messages(row: dict, key: str) -> list[dict]:
    v = row.get(key)
    if v is None:
        raise RowError("MISSING_FIELD", key, f"'{key}' is missing or null")
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(m, dict) for m in v):
        raise RowError("WRONG_TYPE", key, f"'{key}' must be a list of messages, got {type(v).__name__}")
    out = []
    for i, m in enumerate(v):
        if m.get("role") not in ROLES:
            raise RowError("UNKNOWN_ROLE", key, f"message {i} has role {m.get('role')!r}; "
                           f"expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise RowError("WRONG_TYPE", key, f"message {i} content must be a string")
        out.append({k: val for k, val in m.items() if val is not None})
    return out


def _blank(x: str | list[dict]) -> bool:
    if isinstance(x, str):
        return not x.strip()
    return not x or all(not (m.get("content") or "").strip() and not m.get("tool_calls") for m in x)


def _check_roles(prompt: list[dict], completion: list[dict], key: str) -> None:
    convo = prompt + completion
    if any(m["role"] == "system" for m in convo[1:]):
        raise RowError("BAD_ROLE_ORDER", key, "a system message may only come first")
    if prompt[-1]["role"] not in ("user", "tool"):
        raise RowError("BAD_ROLE_ORDER", "prompt", f"prompt must end with a user or tool message, "
                       f"not {prompt[-1]['role']}")
    if completion[0]["role"] != "assistant" or completion[-1]["role"] != "assistant":
        raise RowError("BAD_ROLE_ORDER", key, "completion must start and end with an assistant message")
    turns = [m for m in convo if m["role"] != "system"]
    for a, b in zip(turns, turns[1:]):
        if a["role"] == b["role"] == "user" or (a["role"] == b["role"] == "assistant"
                                                and not a.get("tool_calls")):
            raise RowError("BAD_ROLE_ORDER", key, f"two {a['role']} messages in a row")


def split_implicit(chosen, rejected) -> tuple[Any, Any, Any]:
    """Implicit -> explicit: the prompt is the longest common prefix of chosen and rejected.

    Strings are compared by character; if the character just before the split is a space, the split
    steps back one so that space stays with the completions. Conversations are compared by whole
    message. An identical pair or one side a prefix of the other is rejected (TRL does not check).
    """
    if chosen == rejected:
        raise RowError("IDENTICAL_PAIR", "chosen", "chosen and rejected are identical")
    n = min(len(chosen), len(rejected))
    i = next((k for k in range(n) if chosen[k] != rejected[k]), n)
    if i == n:
        raise RowError("PREFIX_PAIR", "chosen", "one completion is a prefix of the other: no split")
    if isinstance(chosen, str) and i > 0 and chosen[i - 1] == " ":
        i -= 1
    return chosen[:i], chosen[i:], rejected[i:]


def _finish(prompt, chosen, rejected, conversational: bool, row: dict, skip: set) -> Example:
    if _blank(prompt):
        raise RowError("EMPTY_PROMPT", "prompt", "prompt is empty")
    for key, val in (("chosen", chosen), ("rejected", rejected)):
        if _blank(val):
            raise RowError("EMPTY_COMPLETION", key, f"'{key}' completion is empty")
    if chosen == rejected:
        raise RowError("IDENTICAL_PAIR", "chosen", "chosen and rejected are identical")
    if conversational:
        _check_roles(prompt, chosen, "chosen")
        _check_roles(prompt, rejected, "rejected")
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            raise RowError("WRONG_TYPE", "tools", "'tools' is a string but not JSON") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RowError("WRONG_TYPE", "tools", "'tools' must be a list of JSON schemas")
    meta = {k: v for k, v in row.items() if k not in skip | {"prompt", "chosen", "rejected", "tools"}}
    return Example(prompt, chosen, rejected, conversational, tools or None, meta)


# ------------------------------------------------------------------------------------- adapters

def _preference(row: dict, layout: Layout) -> Example:
    get = _messages if layout.conversational else _text
    chosen, rejected = get(row, "chosen"), get(row, "rejected")
    if layout.explicit:
        prompt = get(row, "prompt")
    else:
        prompt, chosen, rejected = split_implicit(chosen, rejected)
    return _finish(prompt, chosen, rejected, layout.conversational, row, set())


def _sharegpt_messages(value: Any, key: str) -> list[dict]:
    if value is None:
        raise RowError("MISSING_FIELD", key, f"'{key}' is missing or null")
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not all(isinstance(m, dict) for m in items):
        raise RowError("WRONG_TYPE", key, f"'{key}' must be ShareGPT messages {{from, value}}")
    out = []
    for i, m in enumerate(items):
        role = SHAREGPT_ROLES.get(m.get("from"))
        if role is None:
            raise RowError("UNKNOWN_ROLE", key, f"message {i} has from={m.get('from')!r}")
        if not isinstance(m.get("value"), str):
            raise RowError("WRONG_TYPE", key, f"message {i} value must be a string")
        out.append({"role": role, "content": m["value"]})
    return out


def _sharegpt(row: dict, layout: Layout) -> Example:
    prompt = _sharegpt_messages(row.get("conversations"), "conversations")
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        prompt = [{"role": "system", "content": system}] + prompt
    chosen = _sharegpt_messages(row.get("chosen"), "chosen")
    rejected = _sharegpt_messages(row.get("rejected"), "rejected")
    return _finish(prompt, chosen, rejected, True, row, {"conversations", "system"})


def parse_hh(text: str, key: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> [{user: a}, {assistant: b}]."""
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError("UNPARSEABLE", key, "not an HH transcript (must start with '\\n\\nHuman:')")
    role = {"Human": "user", "Assistant": "assistant"}
    return [{"role": role[r], "content": c} for r, c in zip(parts[1::2], parts[2::2])]


def _hh(row: dict, layout: Layout) -> Example:
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    prompt, chosen, rejected = split_implicit(parse_hh(chosen, "chosen"), parse_hh(rejected, "rejected"))
    return _finish(prompt, chosen, rejected, True, row, set())


ADAPTERS: dict[str, Callable[[dict, Layout], Example]] = {
    "preference": _preference, "sharegpt": _sharegpt, "hh": _hh,
}


def to_example(row: Any, layout: Layout) -> Example:
    """One raw row -> Example, or RowError. Never any other exception for a malformed row."""
    if not isinstance(row, dict):
        raise RowError("WRONG_TYPE", "<row>", f"row must be an object, got {type(row).__name__}")
    if "__error__" in row:
        raise RowError("BAD_JSON", "<row>", row["__error__"])
    return ADAPTERS[layout.name](row, layout)
