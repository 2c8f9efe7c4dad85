"""The ``eval.sets`` section: named evaluation sets beside the default held-out split, each with its own
data, metrics prefix, judge and sample count."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from data_contracts.config.base import BUILTIN_DATASET, Name, Section

INHERIT = "inherit"  # eval.sets.<name>.judge: take eval.judge
SET_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
PREFIX_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)*/")
# names other metrics and folders already use: a set called "train" would log data/train_pairs twice
RESERVED_NAMES = ("train", "eval")
# metric families the pipeline logs itself; a set's prefix may not start with one (eval/: the default set's)
RESERVED_PREFIXES = ("eval/", "train/", "data/", "precompute/", "system/", "bench/", "bench_ref/", "bench_delta/")


class EvalSetConfig(Section):
    source: Name = Field(description="Preference pairs of this set: a local file or folder, a hub dataset id "
                         "or 'builtin:answer-format@eval' (any layout data.source takes, read with the data "
                         "section's settings; a bare 'builtin:answer-format' is its held-out eval split). "
                         "Rows need a prompt, chosen and rejected: prompt-only rows are rejected by row.")
    prefix: str | None = Field(None, description="Metric prefix of this set, ending in '/' (null: "
                               "'eval_<name>/', e.g. eval_safety/win_rate); unique across sets and not under "
                               "eval/ (the default held-out split's).")
    judge: str | None = Field(INHERIT, description="This set's judge, spelled as eval.judge; 'inherit': "
                              "eval.judge; null: no judge (generations and lengths only).")
    num_prompts: int | None = Field(None, ge=0, description="Prompts of this set to generate on (0: no "
                                    "generation); null: eval.num_prompts.")
    limit: int | None = Field(None, ge=1, description="Use only N valid pairs (picked by the seeded hash "
                              "data.eval_limit uses); null: all.")
    max_new_tokens: int | None = Field(None, ge=1, description="Longest generated response, in tokens; null: "
                                       "eval.max_new_tokens.")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not PREFIX_RE.fullmatch(v):
            raise ValueError("must be letters, digits, '_', '.', '-' in '/'-separated parts ending in '/', "
                             "e.g. 'eval_safety/'")
        hit = next((r for r in RESERVED_PREFIXES if v.startswith(r)), None)
        if hit:
            raise ValueError(f"may not start with {hit!r} (the pipeline's own metrics); e.g. 'eval_safety/'")
        return v

    def metric_prefix(self, name: str) -> str:
        return self.prefix or f"eval_{name}/"

    def resolved_source(self) -> str:
        """``source``, a bare builtin set named by its held-out split (never the train split)."""
        return f"{BUILTIN_DATASET}@eval" if self.source == BUILTIN_DATASET else self.source


def check_sets(sets: dict[str, EvalSetConfig]) -> dict[str, EvalSetConfig]:
    """Names identifier-like and not reserved; metric prefixes distinct and none under another."""
    for name in sets:
        if not SET_NAME_RE.fullmatch(name):
            raise ValueError(f"set name {name!r}: must be a letter then letters, digits or '_' (at most 64), "
                             "e.g. safety")
        if name in RESERVED_NAMES:
            raise ValueError(f"set name {name!r} is reserved (the run's own {name} split); pick another name")
    prefixes = {name: s.metric_prefix(name) for name, s in sets.items()}
    for a, pa in prefixes.items():
        for b, pb in prefixes.items():
            if a < b and (pa.startswith(pb) or pb.startswith(pa)):
                raise ValueError(f"sets {a} and {b}: metric prefixes {pa!r} and {pb!r} overlap; give one "
                                 f"eval.sets.{b}.prefix of its own")
    return sets
