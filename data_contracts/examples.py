"""The canonical preference pair (:class:`Example`), the row error every check raises, and the checks
that build an Example from a row's fields, whatever its layout.

Canonical form (TRL's): ``prompt``, ``chosen``, ``rejected`` are all strings ("standard") or all
lists of ``{"role", "content"}`` messages ("conversational"); the prompt is explicit.

Tools: a ``tools`` column (JSON string or list of JSON schemas, bare ``{name, parameters}`` or OpenAI
``{type: function, function: {...}}``) is normalised to the OpenAI form and forwarded to the chat
template. A ``chat_template_kwargs`` column (a JSON object, e.g. ``{"enable_thinking": false}``) adds
variables to that row's template call, over ``data.chat_template_kwargs``. Assistant ``tool_calls``
are normalised to ``{type: function, function: {name, arguments: dict}}`` (JSON-string arguments
parsed), the form Hugging Face chat templates expect.

A bad row raises :class:`RowError` (code, field, message); the caller records it and goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class RowError(Exception):
    """Why one row is rejected: a reject code (e.g. MISSING_FIELD), the field, a one-line message."""

    def __init__(self, code: str, field: str, message: str):
        super().__init__(message)
        self.code, self.field, self.message = code, field, message

    def __reduce__(self):  # picklable (worker processes send RowErrors back)
        return (RowError, (self.code, self.field, self.message))


@dataclass
class Example:
    """One preference pair in canonical form (see the module docstring)."""

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    is_conversational: bool
    tools: list | None = None
    meta: dict = field(default_factory=dict)
    template_kwargs: dict | None = None  # the row's chat_template_kwargs (extra template variables)
    images: list[dict] | None = None  # references of the row's images (data_contracts.images)


_MISSING = object()  # "not given", as opposed to a given None


def text_field(row: dict, key: str) -> str:
    """The string column ``key`` of a row (MISSING_FIELD, WRONG_TYPE)."""
    v = row.get(key)
    if v is None:
        raise RowError("MISSING_FIELD", key, f"'{key}' is missing or null")
    if not isinstance(v, str):
        raise RowError("WRONG_TYPE", key, f"'{key}' must be a string, got {type(v).__name__}")
    return v


def _json_object(v: Any, code: str, key: str, what: str) -> Any:
    if isinstance(v, str):
        try:
            return json.loads(v) if v.strip() else None
        except (ValueError, RecursionError):
            raise RowError(code, key, f"{what} is a string but not valid JSON") from None
    return v


def parse_tool_calls(calls: Any, key: str, i: int = 0) -> list[dict]:
    """Assistant tool calls -> [{type: function, function: {name, arguments: dict}, id?}].

    Accepts a JSON string, one call or a list; each call OpenAI-nested (``{function: {name,
    arguments}}``) or flat (``{name, arguments}``); arguments a dict or a JSON string of one.
    """
    calls = _json_object(calls, "INVALID_TOOL_CALL", key, f"message {i} tool call")
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls or not all(isinstance(c, dict) for c in calls):
        raise RowError("INVALID_TOOL_CALL", key, f"message {i}: tool calls must be a list of objects")
    out = []
    for c in calls:
        fn = c.get("function", c)
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise RowError("INVALID_TOOL_CALL", key, f"message {i}: a tool call has no function name")
        args = fn.get("arguments", {})
        args = _json_object(args, "INVALID_TOOL_CALL", key, f"message {i} tool call arguments")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise RowError("INVALID_TOOL_CALL", key, f"message {i}: tool call arguments must be a "
                           f"JSON object, got {type(args).__name__}")
        call = {"type": "function", "function": {"name": name, "arguments": args}}
        if c.get("id") is not None:
            call["id"] = c["id"]
        out.append(call)
    return out


def parse_tools(tools: Any, key: str = "tools") -> list[dict] | None:
    """The ``tools`` column -> [{type: function, function: {name, ...}}] or None (INVALID_TOOLS)."""
    tools = _json_object(tools, "INVALID_TOOLS", key, f"'{key}'")
    if tools is None:
        return None
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("INVALID_TOOLS", key, f"'{key}' must be a list of JSON schemas, got "
                       f"{type(tools).__name__}")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if "function" in t else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise RowError("INVALID_TOOLS", key, f"tool {i} has no function name")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise RowError("INVALID_TOOLS", key, f"tool {i} parameters must be a JSON schema object")
        out.append({"type": "function", "function": fn})
    return out or None


# Names apply_chat_template itself passes to the template: a chat_template_kwargs key may not set them.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "conversation", "tools", "documents", "add_generation_prompt",
                                      "continue_final_message", "tokenize", "chat_template", "return_dict"})


def parse_template_kwargs(v: Any, key: str = "chat_template_kwargs") -> dict | None:
    """A row's ``chat_template_kwargs`` (a JSON object or a string of one; e.g. ``{"enable_thinking":
    false}``) -> dict or None (INVALID_TEMPLATE_KWARGS)."""
    v = _json_object(v, "INVALID_TEMPLATE_KWARGS", key, f"'{key}'")
    if v is None:
        return None
    if not isinstance(v, dict):
        raise RowError("INVALID_TEMPLATE_KWARGS", key, f"'{key}' must be a JSON object of template "
                       f"variables, got {type(v).__name__}")
    bad = sorted(k for k in v if not isinstance(k, str) or k in RESERVED_TEMPLATE_KWARGS)
    if bad:
        raise RowError("INVALID_TEMPLATE_KWARGS", key, f"'{key}' may not set {', '.join(map(str, bad))} "
                       "(the chat template call sets them)")
    return v or None


def _blank_content(c) -> bool:
    """A message content with nothing in it: no text (a string or text parts) and no image part."""
    if isinstance(c, list):
        return all(p.get("type") != "image" and not (p.get("text") or "").strip() for p in c)
    return not (c or "").strip()


def _blank(x: str | list[dict]) -> bool:
    if isinstance(x, str):
        return not x.strip()
    return not x or all(_blank_content(m.get("content")) and not m.get("tool_calls") for m in x)


def _check_roles(prompt: list[dict], completion: list[dict], key: str) -> None:
    """System only first; prompt ends with a user or tool turn; the completion is assistant turns
    (tool results allowed between them); a tool turn answers an assistant tool call; no two user
    turns in a row (two assistant turns are allowed: an assistant that goes on, as in HH)."""
    convo = prompt + completion
    if any(m["role"] == "system" for m in convo[1:]):
        raise RowError("BAD_ROLE_ORDER", key, "a system message may only come first")
    if prompt[-1]["role"] not in ("user", "tool"):
        raise RowError("BAD_ROLE_ORDER", "prompt", f"prompt must end with a user or tool message, "
                       f"not {prompt[-1]['role']}")
    if any(m["role"] not in ("assistant", "tool") for m in completion):
        raise RowError("BAD_ROLE_ORDER", key, "completion must be assistant turns (and tool results)")
    if completion[0]["role"] != "assistant" or completion[-1]["role"] != "assistant":
        raise RowError("BAD_ROLE_ORDER", key, "completion must start and end with an assistant message")
    turns = [m for m in convo if m["role"] != "system"]
    if turns and turns[0]["role"] == "tool":
        raise RowError("BAD_ROLE_ORDER", "prompt", "a tool message must follow an assistant tool call")
    for a, b in zip(turns, turns[1:]):
        if a["role"] == b["role"] == "user":  # two assistant turns in a row are real (HH), and TRL's
            raise RowError("BAD_ROLE_ORDER", key, "two user messages in a row")
        if b["role"] == "tool" and not (a["role"] == "tool" or a.get("tool_calls")):
            raise RowError("BAD_ROLE_ORDER", key, "a tool message must follow an assistant tool call")


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


_CANONICAL = {"prompt", "chosen", "rejected", "tools", "chat_template_kwargs", "image", "images"}


def build_example(prompt, chosen, rejected, conversational: bool, row: dict, skip: set,
                  tools: Any = _MISSING, extra_meta: dict | None = None) -> Example:
    """The Example of a parsed row, after the checks every layout shares (non-empty texts, distinct
    completions, role order); ``skip``: row columns that are not meta. ``tools``: the tools if the
    layout keeps them elsewhere than the row's ``tools`` column."""
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
    tools = parse_tools(row.get("tools") if tools is _MISSING else tools)
    template_kwargs = parse_template_kwargs(row.get("chat_template_kwargs"))
    meta = {k: v for k, v in row.items() if k not in skip and k not in _CANONICAL}
    if extra_meta:
        meta.update(extra_meta)
    return Example(prompt, chosen, rejected, conversational, tools, meta, template_kwargs)
