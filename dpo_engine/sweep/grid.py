"""A sweep's variants: parsed from the command line, expanded from a grid or taken from a list,
checked (only sections that do not change validation may vary), and the rule that picks the best."""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

import yaml

from data_contracts.config import ConfigError

# Sections a variant may change: validation (data, model) is shared by all variants.
SWEEPABLE = ("loss", "train", "eval", "reference")


def check_key(key: str) -> None:
    if not isinstance(key, str) or key.split(".", 1)[0] not in SWEEPABLE:
        raise ConfigError(f"sweep: {key}: only {', '.join(s + '.*' for s in SWEEPABLE)} fields can "
                          "vary (the data is validated once for all variants)")


def expand_grid(grid: dict[str, list] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The variants of a sweep, one override dict each, in order. A mapping is a grid:
    ``{"loss.beta": [0.1, 0.2], "train.learning_rate": [1e-6]}`` -> every combination; a list is
    the variants themselves: ``[{"loss.beta": 0.1, "loss.loss_type": "ipo"}, {"loss.beta": 0.3}]``.
    Raises ConfigError for an empty grid or list, a non-sweepable field or a repeated variant."""
    if isinstance(grid, (list, tuple)):
        if not grid:
            raise ConfigError("sweep: the list of variants is empty; give at least one")
        variants = []
        for i, v in enumerate(grid):
            if not isinstance(v, dict) or not v:
                raise ConfigError(f"sweep: variant {i}: needs a non-empty mapping of section.field to "
                                  f"value (got {v!r})")
            for key in v:
                check_key(key)
            if v in variants:
                raise ConfigError(f"sweep: variant {i} repeats variant {variants.index(v)} ({v})")
            variants.append(dict(v))
        return variants
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("sweep: the grid is empty; give at least one field with values")
    for key, values in grid.items():
        check_key(key)
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"sweep: {key}: needs a non-empty list of values")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def best_index(metrics: list[dict[str, float]], metric: str, among: list[int] | None = None) -> int:
    """Index of the variant with the highest ``metric`` (missing or NaN never wins), chosen
    ``among`` the given indices (default: all; a sweep passes the variants not stopped early)."""
    def score(i: int) -> float:
        v = metrics[i].get(metric)
        return -math.inf if v is None or math.isnan(float(v)) else float(v)

    candidates = list(range(len(metrics))) if among is None else list(among)
    if not candidates:
        raise ValueError("sweep: no variant to choose from")
    best = max(candidates, key=score)
    if score(best) == -math.inf:
        raise ValueError(f"sweep: no variant has metric {metric!r}; choose another --metric")
    return best


def check_parallel(parallel) -> int:
    """``parallel`` (variants at a time) as a whole number >= 1; ConfigError otherwise."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"sweep: parallel must be a whole number >= 1 (got {parallel!r})")
    return parallel


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["loss.beta=0.1,0.3"]`` -> ``{"loss.beta": [0.1, 0.3]}`` (values are YAML scalars)."""
    grid = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise ConfigError(f"sweep: --grid {item!r} must look like section.field=v1,v2")
        grid[key.strip()] = [yaml.safe_load(v) for v in raw.split(",")]
    return grid


def parse_variant(item: str) -> dict[str, object]:
    """``"loss.beta=0.1,loss.loss_type=[sigmoid,sft]"`` -> ``{"loss.beta": 0.1, "loss.loss_type":
    ["sigmoid", "sft"]}``: comma-separated ``section.field=value`` pairs (values are YAML, so a value
    may itself hold commas inside brackets)."""
    out = {}
    for pair in re.split(r",(?=\s*[A-Za-z_][\w]*\.[\w.]+\s*=)", item):
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise ConfigError(f"sweep: --variant {item!r} must look like section.field=v[,section.field=v]")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"sweep: --variant {item!r}: {key.strip()}: value {raw!r} is not valid YAML") \
                from None
    return out
