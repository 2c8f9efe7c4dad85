"""Chat messages in the spellings found in public preference files, normalised to
``{"role", "content"}`` (+ ``tool_calls``) messages.

A message is read by the first :data:`SPELLINGS` entry whose role key it has: ``{role, content}``
(OpenAI / TRL) or ``{from, value}`` (ShareGPT). Its role goes through :data:`ROLE_ALIASES`
(``human`` -> user, ``gpt`` -> assistant, ``observation`` -> tool, ``function_call`` -> an assistant
turn whose content is the JSON tool call). Content is a string, or a list of typed parts whose text is
under ``text`` or ``value`` (``[{"type": "text", "text": "..."}]``), joined; parts with image
placeholders (``{"type": "image"}``, TRL's vision format) stay a list of image and text parts (the
images themselves come from the row's ``image``/``images`` column: :mod:`data_contracts.images`). Any other key of the
message (``name``, ``loss_weight``, ``tool_call_id``, ...) is kept as is, so a chat template that
reads it sees it and one that does not ignores it; such a key never fails the row.
"""

from __future__ import annotations

from typing import Any

from data_contracts.examples import ROLES, RowError, parse_tool_calls

# (role key, content key), tried in order.
SPELLINGS = (("role", "content"), ("from", "value"))
ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                "gpt": "assistant", "tool": "tool", "observation": "tool", "function_call": "assistant"}
PART_TEXT_KEYS = ("text", "value")


def _vision_parts(v: list) -> list[dict] | None:
    """Typed parts with an image placeholder, as ``[{type: image}, {type: text, text}]`` (the image
    itself comes from the row's image column; keys an image part carries are dropped); None when
    ``v`` has no image part or a part that is neither."""
    if not any(isinstance(p, dict) and p.get("type") == "image" for p in v):
        return None
    out = []
    for p in v:
        text = next((p[k] for k in PART_TEXT_KEYS if isinstance(p, dict) and isinstance(p.get(k), str)), None)
        if isinstance(p, dict) and p.get("type") == "image":
            out.append({"type": "image"})
        elif isinstance(p, dict) and p.get("type", "text") == "text" and text is not None:
            out.append({"type": "text", "text": text})
        else:
            return None
    return out


def content_text(v: Any, key: str, i: int) -> str | list[dict] | None:
    """A message's content: a string, None, or text parts (``{type: text, text|value}``) joined;
    parts with ``{type: image}`` placeholders stay parts (:func:`_vision_parts`)."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list) and (parts := _vision_parts(v)) is not None:
        return parts
    if isinstance(v, list):
        texts = []
        for p in v:
            text = next((p[k] for k in PART_TEXT_KEYS if isinstance(p, dict) and isinstance(p.get(k), str)),
                        None)
            if text is None or (isinstance(p, dict) and p.get("type", "text") != "text"):
                break
            texts.append(text)
        else:
            return "".join(texts)
    raise RowError("WRONG_TYPE", key, f"message {i} content must be a string or text parts, got "
                   f"{type(v).__name__}")


def _spelling(m: dict) -> tuple[str, str]:
    return next((s for s in SPELLINGS if s[0] in m), SPELLINGS[0])


def message_list(v: Any, key: str) -> list[dict]:
    """``v`` (one message or a list of them, from field ``key``) as checked, normalised messages."""
    if v is None:
        raise RowError("MISSING_FIELD", key, f"'{key}' is missing or null")
    if isinstance(v, dict):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(m, dict) for m in v):
        raise RowError("WRONG_TYPE", key, f"'{key}' must be a list of messages, got {type(v).__name__}")
    out = []
    for i, m in enumerate(v):
        role_key, content_key = _spelling(m)
        spelled = m.get(role_key)
        role = ROLE_ALIASES.get(spelled) if isinstance(spelled, str) else None
        if role is None:
            raise RowError("UNKNOWN_ROLE", key, f"message {i} has {role_key}={spelled!r}; "
                           f"expected one of {', '.join(ROLES)} (or {', '.join(ROLE_ALIASES)})")
        msg = {k: val for k, val in m.items() if val is not None and k not in (role_key, content_key)}
        msg["role"] = role
        content = content_text(m.get(content_key), key, i)
        calls = m.get("tool_calls")
        if spelled == "function_call":  # ShareGPT: the content is the call itself
            calls, content = content, ""
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
        out.append({"role": msg.pop("role"), "content": msg.pop("content"), **msg})
    return out


def message_field(row: dict, key: str) -> list[dict]:
    """The messages of column ``key`` of a row (see :func:`message_list`)."""
    return message_list(row.get(key), key)


def completion_messages(v: Any, key: str) -> list[dict]:
    """A completion column: a plain string (the assistant reply), one message or a list of them."""
    if isinstance(v, str):
        return [{"role": "assistant", "content": v}]
    return message_list(v, key)
