"""Reliability drill 6, bad configuration: every field of RunConfig (walked recursively), given a
wrong type and, where it has bounds, an out-of-range value, fails in load_config with a one-line
ConfigError naming the field's dotted path, and the flow stops before any compute."""

import types
import typing
from typing import Any, Literal

import annotated_types as at
import pytest
from pydantic import BaseModel

from data_contracts.config import ConfigError, RunConfig, load_config


def _leaves(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield path, field, True
            yield from _leaves(ann, path + ".")
        else:
            yield path, field, False


def _args(ann) -> tuple:
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return typing.get_args(ann)
    return (ann,)


def _wrong_value(ann) -> Any:
    """A value no member of the annotation accepts (pydantic lax mode)."""
    members = _args(ann)
    origins = {typing.get_origin(m) or m for m in members}
    if origins & {dict}:
        return 12345  # a number for a mapping
    if origins & {list} or str in origins:
        return {"not": "a scalar"}  # a mapping for a string / list
    if any(typing.get_origin(m) is Literal for m in members):
        return "no-such-choice"
    if bool in origins:
        return "maybe"
    if origins & {int, float}:
        return "fast"
    raise AssertionError(f"no wrong value known for {ann}")


def _out_of_range(field) -> list:
    vals = []
    for m in field.metadata:
        if isinstance(m, at.Ge):
            vals.append(m.ge - 1)
        elif isinstance(m, at.Gt):
            vals.append(m.gt)
        elif isinstance(m, at.Le):
            vals.append(m.le + 1)
        elif isinstance(m, at.Lt):
            vals.append(m.lt)
    return vals


def _cases():
    cases = []
    for path, field, is_section in _leaves(RunConfig):
        if is_section:
            cases.append(pytest.param(path, "not-a-section", id=f"{path}-type"))
            continue
        cases.append(pytest.param(path, _wrong_value(field.annotation), id=f"{path}-type"))
        for v in _out_of_range(field):
            cases.append(pytest.param(path, v, id=f"{path}-range-{v}"))
    return cases


CASES = _cases()


def test_the_walk_covers_every_section_and_some_bounds():
    paths = {c.values[0] for c in CASES}
    assert {"data.source", "model.trust_remote_code", "loss.beta", "train.learning_rate",
            "registry.gate.thresholds", "tracking.mlflow_tracking_uri", "run_name"} <= paths
    assert sum("-range-" in c.id for c in CASES) >= 30


@pytest.mark.parametrize("path,value", CASES)
def test_bad_value_fails_at_load_naming_the_field(path, value):
    with pytest.raises(ConfigError) as err:
        load_config(None, {path: value})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("config error: ")
    assert path in msg, msg


@pytest.mark.parametrize("path,value", CASES[::7])
def test_bad_value_stops_the_flow_before_any_compute(path, value, dpo_home, monkeypatch):
    import flows.dpo as flow_mod

    def never(*a, **k):
        raise AssertionError("compute started with a bad config")
    for name in ("preflight", "new_run_dir", "nothing_new"):
        monkeypatch.setattr(flow_mod, name, never)
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        flow_mod.dpo.fn(overrides={path: value})
    assert not (dpo_home / "runs").exists()
