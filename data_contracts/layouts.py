"""Row layouts: detect how a dataset is shaped and turn each raw row into one canonical
:class:`~data_contracts.examples.Example`. Messages in any common spelling (``{role, content}``,
``{from, value}``, text parts) are read by :mod:`data_contracts.messages`. Layouts:

- ``preference``: TRL columns. Explicit (``prompt``, ``chosen``, ``rejected``) or implicit (``chosen``,
  ``rejected`` only: the prompt is their common prefix, see :func:`data_contracts.examples.split_implicit`).
  A conversational row may give the prompt as a string (one user turn); chosen/rejected that repeat
  the prompt messages first (UltraFeedback-binarized style) have them removed.
- ``openai``: OpenAI preference fine-tuning, ``input: {messages, tools?}``, ``preferred_output``,
  ``non_preferred_output`` (lists of assistant messages).
- :data:`SHAPES`, declarative (which columns hold the prompt, chosen, rejected, system and input):
  ``sharegpt`` (``conversations`` or ``messages`` + ``chosen``/``rejected`` as a string, a message or
  messages, + optional ``system``/``system_prompt``, ``tools``), ``conversation_pair`` (whole
  conversations per side in ``chosen_messages``/``rejected_messages`` or ``chosen_conversations``/
  ``rejected_conversations``, prompt implicit) and ``instruction`` (``question``/``instruction``/
  ``prompt`` + optional ``input`` and ``system``/``system_prompt`` columns; conversational when a
  system column or message completions appear, else plain strings).
- ``hh``: Anthropic HH transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``), parsed into messages.

Any layout: score columns (:data:`SCORE_COLUMNS`) become ``score_chosen``/``score_rejected`` in the
meta, and a pair whose margin is under ``min_score_margin`` is rejected (SCORE_MARGIN_TOO_SMALL).
Any other layout: ``DataConfig.columns`` renames source columns first (:func:`map_columns`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from data_contracts.errors import DataError
from data_contracts.examples import Example, RowError, build_example, split_implicit, text_field
from data_contracts.messages import completion_messages, message_field, message_list

HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
LAYOUT_KEYS = ("chosen", "conversations", "preferred_output", "chosen_messages", "chosen_conversations",
               "rejected_messages", "rejected_conversations")
SYSTEM_COLUMNS = ("system", "system_prompt")
# (chosen, rejected) score columns, first pair present wins; a dotted name reads a nested field.
SCORE_COLUMNS = (("score_chosen", "score_rejected"), ("chosen_score", "rejected_score"),
                 ("chosen_rating", "rejected_rating"), ("metadata.score_chosen", "metadata.score_rejected"))


@dataclass
class Layout:
    name: str  # a key of LAYOUTS
    conversational: bool
    explicit: bool
    reason: str = ""  # why detection chose it (for report.json)
    min_score_margin: float | None = None  # reject pairs whose score_chosen - score_rejected is less


@dataclass(frozen=True)
class Shape:
    """A declarative layout: the candidate columns of each part (the first one a row has is used)."""

    name: str
    why: str
    chosen: tuple[str, ...]
    rejected: tuple[str, ...]
    prompt: tuple[str, ...] = ()  # none: whole conversations per side, the prompt is their prefix
    system: tuple[str, ...] = SYSTEM_COLUMNS
    input: tuple[str, ...] = ()  # appended to a string prompt after a blank line (Alpaca's input)
    marker: tuple[str, ...] = ()  # columns that alone identify the layout (even if a row lacks others)


SHAPES = {s.name: s for s in (
    Shape("conversation_pair", "whole conversations per side (chosen_messages/chosen_conversations)",
          ("chosen_messages", "chosen_conversations"), ("rejected_messages", "rejected_conversations"),
          marker=("chosen_messages", "chosen_conversations", "rejected_messages", "rejected_conversations")),
    Shape("sharegpt", "a 'conversations'/'messages' prompt + 'chosen'/'rejected' (ShareGPT)",
          ("chosen",), ("rejected",), prompt=("conversations", "messages"), marker=("conversations",)),
    Shape("instruction", "an instruction/question prompt (+ input, system columns) + 'chosen'/'rejected'",
          ("chosen",), ("rejected",), prompt=("instruction", "question", "prompt"), input=("input",)),
)}


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


def _explains(shape: Shape, row: dict) -> bool:
    """Whether a shape's columns are what this row has: one of its marker columns, or its prompt,
    chosen and rejected columns."""
    has = lambda names: any(row.get(n) is not None for n in names)
    if any(n in row for n in shape.marker):
        return True
    if not (has(shape.chosen) and has(shape.rejected)) or (shape.prompt and not has(shape.prompt)):
        return False
    if shape.name == "instruction":  # a bare 'prompt' column is TRL's; it needs a system column here
        _, text = _first(row, shape.prompt)
        return isinstance(text, str) and (row.get("prompt") is None or has(shape.system))
    return row.get("prompt") is None  # a 'prompt' column (with 'messages' say) is TRL's


def detect_layout(rows: list, fmt: str = "auto", min_score_margin: float | None = None) -> Layout:
    """Decide the layout from the first well-formed rows (or take the named layout ``fmt``); the
    Layout says why (``reason``). ``min_score_margin``: see :func:`to_example`."""
    sample = [r for r in rows[:200] if isinstance(r, dict) and "__error__" not in r]
    if fmt not in ("auto", *LAYOUTS):
        raise DataError(f"data error: data.format={fmt!r} is unknown; use auto or one of "
                        f"{', '.join(LAYOUTS)}")
    first = next((r for r in sample if any(k in r for k in LAYOUT_KEYS)), {})
    explicit = any("prompt" in r for r in sample)
    how = "named by data.format" if fmt != "auto" else ""

    def made(name: str, conversational: bool, explicit: bool, why: str) -> Layout:
        return Layout(name, conversational, explicit, how or why, min_score_margin)

    if fmt == "openai" or (fmt == "auto" and "preferred_output" in first):
        return made("openai", True, True, "rows have 'preferred_output' (OpenAI preference)")
    for shape in SHAPES.values():
        if fmt == shape.name or (fmt == "auto" and _explains(shape, first)):
            conv = shape.name != "instruction" or any(
                isinstance(_first(r, shape.system)[1], str) or isinstance(r.get("chosen"), (list, dict))
                for r in sample)
            return made(shape.name, conv, bool(shape.prompt), shape.why)
    chosen = first.get("chosen")
    if fmt == "hh" or (fmt == "auto" and not explicit and isinstance(chosen, str)
                       and chosen.startswith("\n\nHuman:")):
        return made("hh", True, False, "'chosen' is an HH transcript ('\\n\\nHuman: ...')")
    conv = isinstance(chosen, (list, dict))
    return made("preference", conv, explicit, f"TRL columns: {'explicit' if explicit else 'implicit'} "
                f"prompt, {'conversational' if conv else 'standard'}")


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


def _first(row: dict, names: tuple[str, ...]) -> tuple[str, Any]:
    """(column, value) of the first of ``names`` the row has (value None if none); the first name
    is the one a MISSING_FIELD reject names."""
    name = next((n for n in names if row.get(n) is not None), names[0])
    return name, row.get(name)


def _with_system(row: dict, shape: Shape, prompt: list[dict]) -> list[dict]:
    """The prompt with the row's system column (if any, and not already a system turn) first."""
    _, system = _first(row, shape.system) if shape.system else ("", None)
    if system is not None and not isinstance(system, str):
        raise RowError("WRONG_TYPE", shape.system[0], f"'{shape.system[0]}' must be a string")
    if system and system.strip() and not (prompt and prompt[0]["role"] == "system"):
        prompt = [{"role": "system", "content": system}] + prompt
    return prompt


def _prompt_text(row: dict, shape: Shape) -> str:
    key, text = _first(row, shape.prompt)
    text = text_field({key: text}, key)
    _, extra = _first(row, shape.input) if shape.input else ("", None)
    if extra is not None and not isinstance(extra, str):
        raise RowError("WRONG_TYPE", shape.input[0], f"'{shape.input[0]}' must be a string")
    return f"{text}\n\n{extra}" if extra and extra.strip() else text


def _shaped(row: dict, layout: Layout) -> Example:
    """A row of a declarative :class:`Shape` layout -> Example (fields checked prompt first)."""
    shape = SHAPES[layout.name]
    ckey, chosen = _first(row, shape.chosen)
    rkey, rejected = _first(row, shape.rejected)
    used = {*shape.prompt, *shape.chosen, *shape.rejected, *shape.system, *shape.input}
    if not layout.conversational:  # plain strings (instruction sets without a system column)
        return build_example(_prompt_text(row, shape), text_field({ckey: chosen}, ckey),
                             text_field({rkey: rejected}, rkey), False, row, used)
    if shape.input:
        prompt = [{"role": "user", "content": _prompt_text(row, shape)}]
    elif shape.prompt:
        pkey, prompt = _first(row, shape.prompt)
        prompt = message_list(prompt, pkey)
    chosen, rejected = completion_messages(chosen, ckey), completion_messages(rejected, rkey)
    if not shape.prompt:  # whole conversations per side: the prompt is their shared prefix
        prompt, chosen, rejected = split_implicit(chosen, rejected)
    elif not shape.input:
        n = len(prompt)
        if chosen[:n] == prompt == rejected[:n] and len(chosen) > n < len(rejected):  # sides repeat it
            chosen, rejected = chosen[n:], rejected[n:]
    return build_example(_with_system(row, shape, prompt), chosen, rejected, True, row, used)


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
    "preference": _preference, "openai": _openai, "hh": _hh, **{name: _shaped for name in SHAPES},
}


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
    ex = LAYOUTS[layout.name](row, layout)
    _scores(row, ex, layout)
    return ex
