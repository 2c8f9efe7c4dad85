"""Row layouts: detect how a dataset is shaped and turn each raw row into one canonical Example.

Canonical form (TRL's): ``prompt``, ``chosen``, ``rejected`` are all strings ("standard") or all
lists of ``{"role", "content"}`` messages ("conversational"); the prompt is explicit. Layouts:

- ``preference``: TRL columns. Explicit (``prompt``, ``chosen``, ``rejected``) or implicit (``chosen``,
  ``rejected`` only: the prompt is their common prefix, see :func:`split_implicit`).
  A conversational row may give the prompt as a string (one user turn); chosen/rejected that repeat
  the prompt messages first (UltraFeedback-binarized style) have them removed.
- ``openai``: OpenAI preference fine-tuning, ``input: {messages, tools?}``, ``preferred_output``,
  ``non_preferred_output`` (lists of assistant messages).
- ``sharegpt``: LLaMA-Factory, ``conversations: [{from, value}]`` + ``chosen``/``rejected``
  ``{from, value}`` (+ optional ``system``, ``tools``). ``function_call`` turns (JSON ``{name,
  arguments}`` or a list of them) become assistant ``tool_calls``; ``observation`` turns ``tool`` messages.
- ``hh``: Anthropic HH transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), parsed into messages.

Any other layout: ``DataConfig.columns`` renames source columns first (:func:`map_columns`).

Tools: a ``tools`` column (JSON string or list of JSON schemas, bare ``{name, parameters}`` or OpenAI
``{type: function, function: {...}}``) is normalised to the OpenAI form and forwarded to the chat
template. A ``chat_template_kwargs`` column (a JSON object, e.g. ``{"enable_thinking": false}``) adds
variables to that row's template call, over ``data.chat_template_kwargs``. Assistant ``tool_calls`` are normalised to ``{type: function, function: {name, arguments:
dict}}`` (JSON-string arguments parsed), the form Hugging Face chat templates expect.

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
LAYOUT_KEYS = ("chosen", "conversations", "preferred_output")


class RowError(Exception):
    def __init__(self, code: str, field: str, message: str):
        super().__init__(message)
        self.code, self.field, self.message = code, field, message

    def __reduce__(self):  # picklable (worker processes send RowErrors back)
        return (RowError, (self.code, self.field, self.message))


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
    template_kwargs: dict | None = None  # the row's chat_template_kwargs (extra template variables)


# ------------------------------------------------------------------------------------- columns

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
    rejected with MISSING_FIELD by its adapter).
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


# ------------------------------------------------------------------------------------- detection

def detect_layout(rows: list, fmt: str = "auto") -> Layout:
    """Decide the layout from the first well-formed rows (or take the named adapter ``fmt``)."""
    sample = [r for r in rows[:200] if isinstance(r, dict) and "__error__" not in r]
    if fmt not in ("auto", *ADAPTERS):
        from data_contracts.errors import DataError
        raise DataError(f"data error: data.format={fmt!r} is unknown; use auto or one of "
                        f"{', '.join(ADAPTERS)}")
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


# ------------------------------------------------------------------------------------- checks

def _text(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        raise RowError("MISSING_FIELD", key, f"'{key}' is missing or null")
    if not isinstance(v, str):
        raise RowError("WRONG_TYPE", key, f"'{key}' must be a string, got {type(v).__name__}")
    return v


def _content(v: Any, key: str, i: int) -> str | None:
    """A message's content: a string, None, or OpenAI text parts [{type: text, text}] joined."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                   and isinstance(p.get("text"), str) for p in v):
        return "".join(p["text"] for p in v)
    raise RowError("WRONG_TYPE", key, f"message {i} content must be a string or text parts, got "
                   f"{type(v).__name__}")


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


def _message_list(v: Any, key: str) -> list[dict]:
    if v is None:
        raise RowError("MISSING_FIELD", key, f"'{key}' is missing or null")
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(m, dict) for m in v):
        raise RowError("WRONG_TYPE", key, f"'{key}' must be a list of messages, got {type(v).__name__}")
    out = []
    for i, m in enumerate(v):
        role = m.get("role")
        if role not in ROLES:
            raise RowError("UNKNOWN_ROLE", key, f"message {i} has role {role!r}; "
                           f"expected one of {', '.join(ROLES)}")
        msg = {k: val for k, val in m.items() if val is not None}
        content = _content(m.get("content"), key, i)
        calls = m.get("tool_calls")
        if calls is not None and calls != []:
            if role != "assistant":
                raise RowError("INVALID_TOOL_CALL", key, f"message {i}: only assistant messages "
                               f"carry tool_calls, not {role}")
            msg["tool_calls"] = parse_tool_calls(calls, key, i)
        else:
            msg.pop("tool_calls", None)
            if content is None:
                raise RowError("WRONG_TYPE", key, f"message {i} content must be a string")
        msg["content"] = content or ""
        out.append(msg)
    return out


def _messages(row: dict, key: str) -> list[dict]:
    return _message_list(row.get(key), key)


def _blank(x: str | list[dict]) -> bool:
    if isinstance(x, str):
        return not x.strip()
    return not x or all(not (m.get("content") or "").strip() and not m.get("tool_calls") for m in x)


def _check_roles(prompt: list[dict], completion: list[dict], key: str) -> None:
    """System only first; prompt ends with a user or tool turn; the completion is assistant turns
    (tool results allowed between them); a tool turn answers an assistant tool call."""
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
        if a["role"] == b["role"] == "user" or (a["role"] == b["role"] == "assistant"
                                                and not a.get("tool_calls")):
            raise RowError("BAD_ROLE_ORDER", key, f"two {a['role']} messages in a row")
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


_CANONICAL = {"prompt", "chosen", "rejected", "tools", "chat_template_kwargs"}


def _finish(prompt, chosen, rejected, conversational: bool, row: dict, skip: set,
            tools: Any = _MISSING, extra_meta: dict | None = None) -> Example:
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


# ------------------------------------------------------------------------------------- adapters

def _preference(row: dict, layout: Layout) -> Example:
    get = _messages if layout.conversational else _text
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
    return _finish(prompt, chosen, rejected, layout.conversational, row, set())


def _openai(row: dict, layout: Layout) -> Example:
    inp = row.get("input")
    if inp is None:
        raise RowError("MISSING_FIELD", "input", "'input' is missing or null")
    if not isinstance(inp, dict):
        raise RowError("WRONG_TYPE", "input", f"'input' must be an object with 'messages', got "
                       f"{type(inp).__name__}")
    prompt = _message_list(inp.get("messages"), "input.messages")
    chosen = _message_list(row.get("preferred_output"), "preferred_output")
    rejected = _message_list(row.get("non_preferred_output"), "non_preferred_output")
    extra = {f"input.{k}": v for k, v in inp.items() if k not in ("messages", "tools")}
    return _finish(prompt, chosen, rejected, True, row,
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
    "preference": _preference, "openai": _openai, "sharegpt": _sharegpt, "hh": _hh,
}


def to_example(row: Any, layout: Layout) -> Example:
    """One raw row -> Example, or RowError. Never any other exception for a malformed row."""
    if not isinstance(row, dict):
        raise RowError("WRONG_TYPE", "<row>", f"row must be an object, got {type(row).__name__}")
    if "__error__" in row:
        raise RowError(row.get("__code__", "BAD_JSON"), "<row>", row["__error__"])
    return ADAPTERS[layout.name](row, layout)
