"""Row checks of validation: parse a batch of raw rows into Examples, give each its example id,
reject texts Parquet cannot store or that are too long, and turn a rejected row into its record in
rejects.parquet."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from data_contracts.examples import Example, RowError
from data_contracts.images import ImageStore, attach_images, summarize
from data_contracts.layouts import map_columns, to_example
from data_contracts.readers import RAW_KEPT, json_head

_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)
_ID_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str, sort_keys=True, separators=(",", ":"))

json_str = json.encoder.encode_basestring  # what both encoders write for a str (ensure_ascii=False)


def to_json(x: Any, **kw) -> str:
    """``x`` as JSON (non-ASCII kept, other objects as str); ``kw``: further ``json.dumps`` options."""
    if not kw:
        return _ENCODER.encode(x)  # a prebuilt encoder: json.dumps(x, **kw) builds one per call
    return json.dumps(x, ensure_ascii=False, default=str, **kw)


def example_id(ex: Example) -> str:
    """16 hex chars of sha256 over the canonical prompt/chosen/rejected JSON (+ tools, the row's
    chat_template_kwargs and its images' sha256 when set)."""
    if not ex.tools and not ex.template_kwargs and not ex.images and ex.prompt.__class__ is ex.chosen.__class__ is ex.rejected.__class__ is str:
        # the same text as the encoder's, without building and walking a dict
        text = (f'{{"chosen":{json_str(ex.chosen)},"prompt":{json_str(ex.prompt)},'
                f'"rejected":{json_str(ex.rejected)}}}')
        return hashlib.sha256(text.encode()).hexdigest()[:16]
    key = {"chosen": ex.chosen, "prompt": ex.prompt, "rejected": ex.rejected}
    if ex.tools:
        key["tools"] = ex.tools
    if ex.template_kwargs:
        key["chat_template_kwargs"] = ex.template_kwargs
    if ex.images:
        key["images"] = [r["sha256"] for r in ex.images]
    return hashlib.sha256(_ID_ENCODER.encode(key).encode()).hexdigest()[:16]


def _utf8_safe(s: str) -> str:
    """``s`` with lone surrogates (valid JSON escapes, not UTF-8) written as backslash escapes."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_texts(ex: Example, max_chars: int) -> None:
    """Reject a text Parquet cannot store (lone surrogates from JSON escapes like \\ud800), and one
    longer than ``max_chars`` characters before it is tokenized (tokenizing an absurdly long text
    costs memory in proportion to it: an 8 MB text took 4 GB). One JSON rendering per structured
    field serves both checks."""
    for name in ("prompt", "chosen", "rejected", "tools", "template_kwargs", "meta"):
        value = getattr(ex, name)
        if not value:
            continue
        text = value if value.__class__ is str else to_json(value)
        if len(text) > max_chars and name in ("prompt", "chosen", "rejected", "tools"):
            raise RowError("TEXT_TOO_LONG", name, f"'{name}' has {len(text):,} characters, more than "
                           f"data.max_text_chars ({max_chars:,}); raise it or shorten the row")
        if not text.isascii():  # ASCII: always encodable
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RowError("INVALID_UNICODE", name, f"not encodable as UTF-8 ({e.reason} at "
                               f"position {e.start})") from None


class RawText(str):
    """A rejected row's raw text already rendered and cut by :func:`raw_text` (by a worker process,
    which sends back this text instead of the whole row): kept as it is."""


def raw_text(raw: Any, max_chars: int = RAW_KEPT) -> str:
    """The raw text rejects.parquet keeps of a rejected row: its JSON cut to ``max_chars``
    characters (at most RAW_KEPT); a :class:`RawText` as it is."""
    if isinstance(raw, RawText):
        return raw
    keep = min(max_chars, RAW_KEPT)
    try:  # a huge text is not written whole just to be cut (readers.json_head)
        text, n = json_head(summarize(raw), keep)
    except (ValueError, RecursionError, TypeError):
        text = repr(raw)[:keep + 1]
        n = len(text)
    if n > keep:  # bounded: the row is still named by source_index and code
        text = text[:keep] + f"...[cut: {n:,} characters in all]"
    return text


def reject_record(index: int, err: RowError, raw: Any, max_chars: int = RAW_KEPT) -> dict:
    """The rejects.parquet row (REJECT_SCHEMA) of source row ``index``, rejected for ``err``; its raw
    text is cut to ``max_chars`` characters (at most RAW_KEPT, :func:`raw_text`)."""
    text = raw_text(raw, max_chars)
    return {"source_index": index, "code": err.code, "field": _utf8_safe(str(err.field)),
            "message": _utf8_safe(str(err.message)), "raw": _utf8_safe(text)}


def as_row_error(e: Exception) -> RowError:
    """``e`` itself when it is a RowError, else a MALFORMED one naming it; without a traceback,
    whose frames would keep the batch's rows alive until the garbage collector runs (the list of
    rejects in those frames holds the error: a reference cycle)."""
    if isinstance(e, RowError):
        return e.with_traceback(None)
    return RowError("MALFORMED", "<row>", f"{type(e).__name__}: {e}"[:300])


def parse_rows(rows: list, idx, layout, columns: dict, max_chars: int,
               images: ImageStore | None = None) -> tuple[list, list]:
    """(bad, parsed): bad = [(index, RowError, raw)], parsed = [(offset, index, example id, raw,
    Example)] in source order (raw after column mapping). ``images``: where a row's images are
    checked and stored (None: the model takes no images, and rows with images are rejected)."""
    bad: list[tuple[int, RowError, Any]] = []
    parsed: list[tuple[int, int, str, Any, Example]] = []
    for off, raw in enumerate(rows):
        if columns:
            raw = map_columns(raw, columns)
        try:
            ex = to_example(raw, layout)
            _check_texts(ex, max_chars)
            attach_images(ex, raw, images)
            parsed.append((off, idx[off], example_id(ex), raw, ex))
        except Exception as e:  # a malformed row never stops the run under quarantine
            bad.append((idx[off], as_row_error(e), raw))
    return bad, parsed
