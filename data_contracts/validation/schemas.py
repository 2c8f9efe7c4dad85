"""The Parquet schemas of a validated split: ``valid.parquet`` (the contract the engine reads) and
``rejects.parquet`` (one row per rejected or duplicate input row)."""

from __future__ import annotations

import pyarrow as pa

_ids = pa.list_(pa.int32())
VALID_SCHEMA = pa.schema([
    ("example_id", pa.string()), ("source_index", pa.int64()),
    ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
    ("is_conversational", pa.bool_()), ("tools", pa.string()), ("chat_template_kwargs", pa.string()),
    ("meta", pa.string()),
    ("prompt_input_ids", _ids), ("chosen_input_ids", _ids), ("rejected_input_ids", _ids),
    ("prompt_len", pa.int32()), ("chosen_len", pa.int32()), ("rejected_len", pa.int32()),
    ("images", pa.string()),  # JSON list of image references (data_contracts.images), null: no images
])
REJECT_SCHEMA = pa.schema([("source_index", pa.int64()), ("code", pa.string()),
                           ("field", pa.string()), ("message", pa.string()), ("raw", pa.string())])
