"""Row layouts: detect how a dataset is shaped and turn each raw row into one canonical
:class:`~data_contracts.examples.Example`.

Every layout is a :class:`Layout` description in :data:`LAYOUTS` (no layout has its own parser): which
columns hold the prompt, chosen, rejected, system, input and tools (dotted names read nested fields,
the first column a row has wins), how the completions are spelled (plain strings or messages, decided
from the rows; or HH transcripts), and the column sets (``signatures``) whose presence identifies it.
Detection takes the first layout, in table order, with a signature the rows have, and says why in
``report.json``; ``preference`` (TRL's columns) explains everything else. Messages in any common
spelling (``{role, content}``, ``{from, value}``, text parts) are read by
:mod:`data_contracts.messages`.

Any layout: a string prompt with message completions becomes one user turn; completions that repeat
the prompt turns first (UltraFeedback-binarized style) have them removed; without a prompt column the
prompt is the shared prefix of the two sides (:func:`data_contracts.examples.split_implicit`). Score
columns (:data:`SCORE_COLUMNS`) become ``score_chosen``/``score_rejected`` in the meta, and a pair
whose margin is under ``min_score_margin`` is rejected (SCORE_MARGIN_TOO_SMALL). ``DataConfig.columns``
renames source columns first (:func:`map_columns`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from data_contracts.errors import DataError
from data_contracts.examples import Example, RowError, build_example, split_implicit, text_field
from data_contracts.messages import completion_messages, message_list

HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
SYSTEM_COLUMNS = ("system", "system_prompt")
# (chosen, rejected) score columns, first pair present wins; a dotted name reads a nested field.
SCORE_COLUMNS = (("score_chosen", "score_rejected"), ("chosen_score", "rejected_score"),
                 ("chosen_rating", "rejected_rating"), ("metadata.score_chosen", "metadata.score_rejected"))


@dataclass(frozen=True)
class Shape:
    """A row layout's description (see the module docstring)."""

    name: str
    why: str
    chosen: tuple[str, ...]
    rejected: tuple[str, ...]
    prompt: tuple[str, ...] = ()  # none: whole conversations per side, the prompt is their prefix
    system: tuple[str, ...] = ()  # a system message put first in the prompt
    input: tuple[str, ...] = ()  # appended to a string prompt after a blank line (Alpaca's input)
    tools: tuple[str, ...] = ("tools",)
    # column sets that identify the layout: (columns all present, columns that must be absent)
    signatures: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = ()
    # completions: "messages" (lists of messages), "replies" (also a string: the assistant's reply) or
    # "hh" (transcripts); text_ok: a dataset may instead be all plain strings (decided from its rows)
    sides: str = "messages"
    text_ok: bool = False
    prompt_optional: bool = False  # rows without a prompt column are implicit (TRL's columns)
    string_prompt: bool = False  # the prompt column holds text (instruction sets)


@dataclass
class Layout:
    """The layout detected for a dataset (or named by ``data.format``)."""

    name: str  # a key of LAYOUTS
    conversational: bool
    explicit: bool
    reason: str = ""  # why detection chose it (for report.json)
    min_score_margin: float | None = None  # reject pairs whose score_chosen - score_rejected is less


def _pair(*extra: str) -> tuple[str, ...]:
    return (*extra, "chosen", "rejected")


LAYOUTS = {s.name: s for s in (
    Shape("openai", "rows have 'preferred_output' (OpenAI preference)", ("preferred_output",),
           ("non_preferred_output",), prompt=("input.messages",), tools=("input.tools", "tools"),
           signatures=((("preferred_output",), ()),)),
    Shape("conversation_pair", "whole conversations per side (chosen_messages/chosen_conversations)",
           ("chosen_messages", "chosen_conversations"), ("rejected_messages", "rejected_conversations"),
           system=SYSTEM_COLUMNS, sides="replies",
           signatures=tuple(((c,), ()) for c in ("chosen_messages", "chosen_conversations",
                                                  "rejected_messages", "rejected_conversations"))),
    Shape("sharegpt", "a 'conversations'/'messages' prompt + 'chosen'/'rejected' (ShareGPT)",
           ("chosen",), ("rejected",), prompt=("conversations", "messages"), system=SYSTEM_COLUMNS,
           signatures=((("conversations",), ()), (_pair("messages"), ("prompt",))), sides="replies"),
    Shape("instruction", "an instruction/question prompt (+ input, system columns) + 'chosen'/'rejected'",
           ("chosen",), ("rejected",), prompt=("instruction", "question", "prompt"), system=SYSTEM_COLUMNS,
           input=("input",), string_prompt=True, sides="replies", text_ok=True,
           signatures=((_pair("instruction"), ("prompt",)), (_pair("question"), ("prompt",)),
                       (_pair("prompt", "system"), ()), (_pair("prompt", "system_prompt"), ()))),
    Shape("hh", "'chosen' is an HH transcript ('\\n\\nHuman: ...')", ("chosen",), ("rejected",),
           signatures=((_pair(), ("prompt",)),), sides="hh"),
    Shape("preference", "TRL columns", ("chosen",), ("rejected",), prompt=("prompt",),
           text_ok=True, prompt_optional=True),
)}
# the columns any layout is recognised by: a row with none of them says nothing about the layout
LAYOUT_KEYS = tuple(dict.fromkeys(c for s in LAYOUTS.values() for c in (
    *s.chosen, *s.rejected, *(sig[0] for sig, _ in s.signatures if len(sig) == 1))))
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
    rejected with MISSING_FIELD by its layout).
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


def _first(row: dict, names: tuple[str, ...]) -> tuple[str, Any]:
    """(column, value) of the first of ``names`` the row has non-null (value None if none: the first
    name is then the one a MISSING_FIELD reject names). A dotted name whose parent is not an object
    is a WRONG_TYPE reject."""
    for name in names:
        val = _dig(row, name)
        if val is not _MISSING and val is not None:
            return name, val
    parent = names[0].rpartition(".")[0] if names else ""
    if parent and row.get(parent) is not None and not isinstance(row[parent], dict):
        raise RowError("WRONG_TYPE", parent, f"'{parent}' must be an object with "
                       f"'{names[0].rpartition('.')[2]}', got {type(row[parent]).__name__}")
    return (names[0] if names else ""), None


def _explains(shape: Shape, row: dict) -> bool:
    """Whether the row has one of the shape's signatures (its columns present, the forbidden ones
    absent or null), a string prompt where the shape needs one, an HH transcript for ``hh``."""
    if not any(all(c in row for c in need) and all(row.get(c) is None for c in absent)
               for need, absent in shape.signatures):
        return False
    if shape.string_prompt:
        return isinstance(_first(row, shape.prompt)[1], str)
    if shape.sides == "hh":
        chosen = row.get(shape.chosen[0])
        return isinstance(chosen, str) and chosen.startswith("\n\nHuman:")
    return True


def detect_layout(rows: list, fmt: str = "auto", min_score_margin: float | None = None) -> Layout:
    """Decide the layout from the first well-formed rows (or take the named layout ``fmt``): the
    first of :data:`LAYOUTS` that explains the first row with a layout column, else ``preference``.
    The Layout says why (``reason``). ``min_score_margin``: see :func:`to_example`."""
    sample = [r for r in rows[:200] if isinstance(r, dict) and "__error__" not in r]
    if fmt not in ("auto", *LAYOUTS):
        raise DataError(f"data error: data.format={fmt!r} is unknown; use auto or one of "
                        f"{', '.join(LAYOUTS)}")
    first = next((r for r in sample if any(k in r for k in LAYOUT_KEYS)), {})
    shape = LAYOUTS[fmt] if fmt != "auto" else next(
        (s for s in LAYOUTS.values() if _explains(s, first)), LAYOUTS["preference"])
    explicit = bool(shape.prompt) and (not shape.prompt_optional or any(
        _first(r, shape.prompt)[1] is not None for r in sample))
    conv = not shape.text_ok or isinstance(_first(first, shape.chosen)[1], (list, dict)) or (
        bool(shape.system) and any(isinstance(_first(r, shape.system)[1], str)
                                   or isinstance(_first(r, shape.chosen)[1], (list, dict)) for r in sample))
    why = shape.why if shape.name != "preference" else (
        f"TRL columns: {'explicit' if explicit else 'implicit'} prompt, "
        f"{'conversational' if conv else 'standard'}")
    return Layout(shape.name, conv, explicit, "named by data.format" if fmt != "auto" else why,
                  min_score_margin)


def parse_hh(text: str, key: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> [{user: a}, {assistant: b}]."""
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError("UNPARSEABLE", key, "not an HH transcript (must start with '\\n\\nHuman:')")
    role = {"Human": "user", "Assistant": "assistant"}
    return [{"role": role[r], "content": c} for r, c in zip(parts[1::2], parts[2::2])]


def _side(row: dict, names: tuple[str, ...], shape: Shape, conversational: bool) -> Any:
    key, val = _first(row, names)
    if shape.sides == "hh":
        return parse_hh(text_field({key: val}, key), key)
    if not conversational:
        return text_field({key: val}, key)
    return completion_messages(val, key) if shape.sides == "replies" else message_list(val, key)


def _prompt(row: dict, shape: Shape, conversational: bool) -> str | list[dict]:
    """The explicit prompt: text (+ the input column after a blank line), or messages (a string
    prompt of a conversational row is one user turn)."""
    key, val = _first(row, shape.prompt)
    if conversational and not shape.string_prompt and not isinstance(val, str):
        return message_list(val, key)
    text = text_field({key: val}, key)
    _, extra = _first(row, shape.input) if shape.input else ("", None)
    if extra is not None and not isinstance(extra, str):
        raise RowError("WRONG_TYPE", shape.input[0], f"'{shape.input[0]}' must be a string")
    text = f"{text}\n\n{extra}" if extra and extra.strip() else text
    return [{"role": "user", "content": text}] if conversational else text


def _with_system(row: dict, shape: Shape, prompt: list[dict]) -> list[dict]:
    """The prompt with the row's system column (if any, and not already a system turn) first."""
    _, system = _first(row, shape.system) if shape.system else ("", None)
    if system is not None and not isinstance(system, str):
        raise RowError("WRONG_TYPE", shape.system[0], f"'{shape.system[0]}' must be a string")
    if system and system.strip() and not (prompt and prompt[0]["role"] == "system"):
        prompt = [{"role": "system", "content": system}] + prompt
    return prompt


def _nested_meta(row: dict, shape: Shape, used: set[str]) -> dict:
    """The other keys of the objects a dotted column reads (OpenAI's ``input``), as ``input.key``."""
    out = {}
    for parent in {c.split(".")[0] for c in (*shape.prompt, *shape.tools) if "." in c}:
        if isinstance(row.get(parent), dict):
            out.update({f"{parent}.{k}": v for k, v in row[parent].items() if f"{parent}.{k}" not in used})
    return out


def _parse(row: dict, layout: Layout) -> Example:
    """A row -> Example by its layout's description (prompt first, then chosen, rejected)."""
    shape, conv = LAYOUTS[layout.name], layout.conversational
    prompt = _prompt(row, shape, conv) if layout.explicit and shape.prompt else None
    chosen = _side(row, shape.chosen, shape, conv)
    rejected = _side(row, shape.rejected, shape, conv)
    if prompt is None:  # implicit: the prompt is the sides' shared prefix
        prompt, chosen, rejected = split_implicit(chosen, rejected)
    elif conv:  # completions that repeat the prompt turns first (UltraFeedback-binarized)
        n = len(prompt)
        if chosen[:n] == prompt == rejected[:n] and len(chosen) > n < len(rejected):
            chosen, rejected = chosen[n:], rejected[n:]
    if conv and shape.system:
        prompt = _with_system(row, shape, prompt)
    columns = {*shape.prompt, *shape.chosen, *shape.rejected, *shape.system, *shape.input, *shape.tools}
    return build_example(prompt, chosen, rejected, conv, row, {c.split(".")[0] for c in columns},
                         tools=_first(row, shape.tools)[1], extra_meta=_nested_meta(row, shape, columns))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _scores(row: dict, ex: Example, layout: Layout) -> None:
    """Carry the row's score pair into ``ex.meta`` as score_chosen/score_rejected (moving top-level
    columns) and apply ``layout.min_score_margin``. A row without scores is kept."""
    for ckey, rkey in SCORE_COLUMNS:
        sc, sr = _dig(row, ckey), _dig(row, rkey)
        if _number(sc) and _number(sr):
            break
    else:
        return
    for key in (ckey, rkey):
        ex.meta.pop(key, None)
    ex.meta["score_chosen"], ex.meta["score_rejected"] = sc, sr
    if layout.min_score_margin is not None and sc - sr < layout.min_score_margin:
        raise RowError("SCORE_MARGIN_TOO_SMALL", ckey, f"score margin {sc - sr:g} ({ckey} {sc:g}, {rkey} "
                       f"{sr:g}) is under data.min_score_margin={layout.min_score_margin:g}")


def to_example(row: Any, layout: Layout) -> Example:
    """One raw row -> Example, or RowError. Never any other exception for a malformed row."""
    if not isinstance(row, dict):
        raise RowError("WRONG_TYPE", "<row>", f"row must be an object, got {type(row).__name__}")
    if "__error__" in row:
        raise RowError(row.get("__code__", "BAD_JSON"), "<row>", row["__error__"])
    ex = _parse(row, layout)
    _scores(row, ex, layout)
    return ex
