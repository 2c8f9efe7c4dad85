"""The ``data`` section: where the pairs come from, their layout, limits and the reject policy."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from data_contracts.config.base import BUILTIN_DATASET, Name, Section, Seed
from data_contracts.examples import RESERVED_TEMPLATE_KWARGS


class DataConfig(Section):
    source: Name = Field(BUILTIN_DATASET, description="Train data: a local file/folder, a hub dataset id, "
                        "or 'builtin:answer-format' (the bundled, generated dataset). '{date}' in a path "
                        "is replaced at run time by today's UTC date (YYYY-MM-DD), also in eval_source, "
                        "e.g. '/data/prefs/{date}.jsonl'.")
    source_partition: Literal["all", "newest"] = Field("all", description="For a folder source: 'all' "
                                                       "reads every file in it; 'newest' takes only its "
                                                       "last entry (sub-folder or file) sorted by name, "
                                                       "e.g. the latest of data/2026-11-22/, data/2026-11-23/.")
    eval_source: str | None = Field(None, description="Held-out data; default: the builtin eval split, or "
                                    "eval_fraction of source.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Held-out share of source when "
                                 "eval_source is not given.")
    format: Name = Field("auto", description="Input layout: auto (detected from the first rows), or a "
                        "named layout: preference (TRL columns), openai, sharegpt, conversation_pair, "
                        "instruction, hh.")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename source columns before "
                                    "detection: {canonical: source}, e.g. {prompt: question, chosen: "
                                    "good, rejected: bad}; a dotted source ('meta.q') reads a nested field.")
    min_score_margin: float | None = Field(None, description="Drop (reject as SCORE_MARGIN_TOO_SMALL) a "
                                           "pair whose score_chosen - score_rejected (or chosen_rating, "
                                           "chosen_score, metadata.score_chosen ...) is under this; "
                                           "rows without scores are kept. null: no filter.")
    train_limit: int | None = Field(None, ge=1, description="Use only the first N valid train pairs "
                                    "(after a seeded shuffle).")
    eval_limit: int | None = Field(None, ge=1, description="Use only the first N valid eval pairs.")
    max_length: int = Field(1024, ge=8, description="Max tokens of prompt + completion (TRL default).")
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra variables for "
                                                 "the chat template of conversational rows, as TRL's "
                                                 "chat_template_kwargs (e.g. {enable_thinking: false} for "
                                                 "Qwen3); a row's own chat_template_kwargs column "
                                                 "overrides them key by key.")
    max_text_chars: int | None = Field(None, ge=1, description="Reject (TEXT_TOO_LONG) a prompt, chosen, "
                                       "rejected or tools field longer than this many characters before "
                                       "tokenizing it (memory grows with a text's length). null: 64 x "
                                       "max_length, at least 100,000.")
    max_image_bytes: int = Field(64 * 2**20, ge=1, description="Reject (IMAGE_TOO_LARGE) an image file or "
                                 "payload larger than this many bytes, before it is read.")
    max_image_pixels: int = Field(50_000_000, ge=1, description="Reject (IMAGE_TOO_LARGE) an image with more "
                                  "pixels than this (width x height from its header), before it is decoded.")
    truncation_mode: Literal["keep_start", "keep_end"] = Field("keep_start", description="A pair longer "
                                                               "than max_length: keep_start cuts the end of "
                                                               "the completions (TRL's default); keep_end "
                                                               "cuts the start of the prompt.")
    invalid_policy: Literal["fail", "quarantine"] = Field("quarantine", description="A rejected row: "
                                                          "quarantine writes it to rejects.parquet with its "
                                                          "code and goes on; fail stops at the first one.")
    max_invalid_fraction: float = Field(0.05, ge=0.0, le=1.0, description="quarantine: the split fails its "
                                        "policy (exit code 3) when more than this share of its rows is "
                                        "rejected.")
    shuffle_seed: Seed = Field(0, description="Seed of the shuffle before train_limit/eval_limit and the "
                               "eval_fraction hold-out.")
    num_proc: int | None = Field(None, ge=1, exclude=True, description="Worker processes that parse and "
                                 "tokenize batches (fork). null (auto): min(CPUs, 8) when the input is "
                                 "large (>= 50,000 rows or 16 MiB of files), else 1. The output is "
                                 "identical for any value, so it is not part of the config hash or the "
                                 "saved config.")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(k for k in v if k in RESERVED_TEMPLATE_KWARGS)
        if bad:
            raise ValueError(f"may not set {', '.join(bad)} (the chat template call sets them)")
        return v

    @property
    def text_char_limit(self) -> int:
        """``max_text_chars``, or its default: 64 characters per token of max_length, at least 100,000."""
        return self.max_text_chars or max(100_000, 64 * self.max_length)

    @field_validator("columns")
    @classmethod
    def _columns(cls, v: dict[str, str]) -> dict[str, str]:
        known = ("prompt", "chosen", "rejected", "tools", "chat_template_kwargs", "system", "conversations",
                 "input", "preferred_output", "non_preferred_output", "messages", "system_prompt",
                 "instruction", "question", "chosen_messages", "rejected_messages", "score_chosen",
                 "score_rejected")
        for target, src in v.items():
            if target not in known:
                raise ValueError(f"unknown target column {target!r}; use one of {', '.join(known)}")
            if not isinstance(src, str) or not src.strip():
                raise ValueError(f"{target}: source column name must be a non-empty string")
        sources = list(v.values())
        dup = next((s for s in sources if sources.count(s) > 1), None)
        if dup is not None:
            raise ValueError(f"source column {dup!r} is mapped twice")
        return v
