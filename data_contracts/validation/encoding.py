"""Tokenize the parsed rows of one batch (one tokenizer call per kind of text) into a table of
valid rows (VALID_SCHEMA), isolating any row that breaks the batch call."""

from __future__ import annotations

import pyarrow as pa

from data_contracts.config import DataConfig
from data_contracts.encode import Encoded, encode_batch
from data_contracts.examples import Example, RowError
from data_contracts.images import VisionRows
from data_contracts.validation.rows import as_row_error, json_str, to_json
from data_contracts.validation.schemas import VALID_SCHEMA


def _valid_table(recs: list[tuple[int, Example, str, Encoded]]) -> pa.Table:
    js = lambda x: json_str(x) if x.__class__ is str else to_json(x)  # noqa: E731
    encs = [enc for *_, enc in recs]
    exs = [ex for _, ex, _, _ in recs]
    cols = {
        "example_id": [eid for _, _, eid, _ in recs], "source_index": [i for i, *_ in recs],
        "prompt": [js(ex.prompt) for ex in exs], "chosen": [js(ex.chosen) for ex in exs],
        "rejected": [js(ex.rejected) for ex in exs],
        "is_conversational": [ex.is_conversational for ex in exs],
        "tools": [to_json(ex.tools) if ex.tools else None for ex in exs],
        "chat_template_kwargs": [to_json(ex.template_kwargs) if ex.template_kwargs else None for ex in exs],
        "meta": [to_json(ex.meta) if ex.meta else "{}" for ex in exs],
        "prompt_input_ids": [e.prompt for e in encs], "chosen_input_ids": [e.chosen for e in encs],
        "rejected_input_ids": [e.rejected for e in encs],
        "prompt_len": [len(e.prompt) for e in encs], "chosen_len": [len(e.chosen) for e in encs],
        "rejected_len": [len(e.rejected) for e in encs],
        "images": [to_json(ex.images) if ex.images else None for ex in exs],
    }
    return pa.Table.from_pydict(cols, schema=VALID_SCHEMA)


def _encode(examples: list[Example], tok, cfg: DataConfig, vision: VisionRows | None = None) -> list:
    try:
        return encode_batch(examples, tok, cfg.max_length, cfg.truncation_mode, cfg.chat_template_kwargs, vision)
    except Exception:  # one bad row broke the batch call: isolate it
        out = []
        for ex in examples:
            try:
                out += encode_batch([ex], tok, cfg.max_length, cfg.truncation_mode, cfg.chat_template_kwargs, vision)
            except Exception as e:
                out.append(as_row_error(e))
        return out


def encode_rows(todo: list, tok, cfg: DataConfig, vision: VisionRows | None = None
                ) -> tuple[list, pa.Table | None, list[int]]:
    """Tokenize parsed rows (see :func:`~data_contracts.validation.rows.parse_rows`): (status, table,
    truncated). ``status[k]`` is the row's position in ``table`` (VALID_SCHEMA) or its RowError;
    ``truncated[p]``: tokens cut from table row p. ``vision``: the processor of rows with images."""
    encs = _encode([ex for *_, ex in todo], tok, cfg, vision)
    status: list = []
    recs: list[tuple[int, Example, str, Encoded]] = []
    for (_, i, eid, _, ex), enc in zip(todo, encs):
        if isinstance(enc, RowError):
            status.append(enc)
        else:
            status.append(len(recs))
            recs.append((i, ex, eid, enc))
    return status, (_valid_table(recs) if recs else None), [enc.truncated for *_, enc in recs]
