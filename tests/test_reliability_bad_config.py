"""Reliability drill 6, bad configuration: every field of RunConfig (walked recursively), given a
wrong type, where it has bounds an out-of-range value, and where it holds floats inf/-inf/nan,
fails in load_config with a one-line ConfigError naming the field's dotted path, and the flow stops
before any compute. So do the validator-enforced rules (loss types, step counts, metric and PEFT type
names, run_name as one folder name), empty required names, and the local files that preflight checks
(before the run folder exists)."""

import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
import pytest
from pydantic import BaseModel

from data_contracts.config import EVAL_STEP_METRICS, PAIR_METRICS, TRAIN_STEP_METRICS, ConfigError, RunConfig, load_config


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


def _non_finite(ann) -> list:
    """inf, -inf and nan in the place of a float, a list's float or a mapping's float value."""
    bad = (float("inf"), float("-inf"), float("nan"))
    for m in _args(ann):
        origin, args = typing.get_origin(m), typing.get_args(m)
        if m is float:
            return list(bad)
        if origin is list and args == (float,):
            return [[1.0, v] for v in bad]
        if origin is dict and args[1:] == (float,):
            return [{"eval/win_rate": v} for v in bad]
    return []


def _cases():
    cases = []
    for path, field, is_section in _leaves(RunConfig):
        if is_section:
            cases.append(pytest.param(path, "not-a-section", id=f"{path}-type"))
            continue
        cases.append(pytest.param(path, _wrong_value(field.annotation), id=f"{path}-type"))
        for v in _out_of_range(field):
            cases.append(pytest.param(path, v, id=f"{path}-range-{v}"))
        for v in _non_finite(field.annotation):
            cases.append(pytest.param(path, v, id=f"{path}-nonfinite-{v}"))
    return cases


CASES = _cases()

# Fields a run cannot do without: empty (or blank) is an error, not "use the default".
REQUIRED_NAMES = ("data.source", "data.format", "model.name_or_path", "peft.peft_type", "registry.experiment",
                  "registry.model_name")

# Rules that live in validators, not in the fields' bounds: (field named in the message, overrides).
VALIDATOR_CASES = [
    ("train.max_steps", {"train.max_steps": 0}),
    ("train.max_steps", {"train.max_steps": -2}),
    ("train.early_stopping_metric", {"train.early_stopping_metric": "nosuch", "train.eval_steps": 1}),
    ("train.early_stopping_metric", {"train.early_stopping_metric": "eval/win_rate", "train.eval_steps": 1}),
    ("train.early_stopping_metric", {"train.early_stopping_metric": "eval/loss"}),  # needs eval_steps
    ("train.early_stopping_metric", {"train.early_stopping_metric": ""}),
    ("loss.loss_type", {"loss.loss_type": "nosuch"}),
    ("loss.loss_type", {"loss.loss_type": ["sigmoid", "nosuch"]}),
    ("loss.loss_type", {"loss.loss_type": []}),
    ("loss.loss_type", {"loss.loss_type": ["sigmoid", "sigmoid"]}),
    ("loss.loss_weights", {"loss.loss_weights": [-1.0]}),
    ("loss.loss_weights", {"loss.loss_type": ["sigmoid", "sft"], "loss.loss_weights": [1.0]}),
    ("loss.label_smoothing", {"loss.loss_type": "hinge", "loss.label_smoothing": 0.1}),
    ("loss.label_smoothing", {"loss.loss_type": "exo_pair"}),
    ("loss.label_smoothing", {"loss.label_smoothing": 0.5}),
    ("loss.use_weighting", {"loss.loss_type": "aot", "loss.use_weighting": True}),
    ("loss.f_divergence_type", {"loss.loss_type": "apo_zero", "loss.f_divergence_type": "js_divergence"}),
    ("peft.peft_type", {"peft.peft_type": "NOSUCH"}),
    ("peft.peft_type", {"peft.peft_type": "lora adapter"}),
    ("reference.sync_ref_model", {"reference.sync_ref_model": True}),
    ("reference.model_path", {"reference.source": "adapter_disabled", "reference.model_path": "x"}),
    ("data.columns", {"data.columns": {"nosuch": "q"}}),
    ("data.columns", {"data.columns": {"prompt": "q", "chosen": "q"}}),
    ("data.columns", {"data.columns": {"prompt": " "}}),
    ("data.chat_template_kwargs", {"data.chat_template_kwargs": {"add_generation_prompt": True}}),
    ("model.init_kwargs", {"model.init_kwargs": {"trust_remote_code": True}}),
    ("registry.model_name", {"registry.model_name": "team/model"}),
    ("registry.model_name", {"registry.model_name": "model:1"}),
    ("registry.model_name", {"registry.model_name": "it's"}),
    ("registry.model_name", {"registry.model_name": ".."}),
    ("registry.experiment", {"registry.experiment": "x" * 501}),
    *[(name, {name: v}) for name in REQUIRED_NAMES for v in ("", "   ")],
    *[("run_name", {"run_name": v}) for v in ("../../etc", "..", ".", ".hidden", "a/b", "/abs", "a\\b", "",
                                              "two words", "x" * 129, "line\nbreak", "tab\t", "ü")],
]
VALIDATOR_PARAMS = [pytest.param(field, ov, id=f"{field}-{i}") for i, (field, ov) in enumerate(VALIDATOR_CASES)]


def test_the_walk_covers_every_section_and_some_bounds():
    paths = {c.values[0] for c in CASES}
    assert {"data.source", "model.trust_remote_code", "loss.beta", "train.learning_rate",
            "registry.gate.thresholds", "tracking.mlflow_tracking_uri", "run_name"} <= paths
    assert sum("-range-" in c.id for c in CASES) >= 30
    non_finite = {c.values[0] for c in CASES if "-nonfinite-" in c.id}
    assert {"train.learning_rate", "registry.retry_timeout_s", "registry.gate.min_improvement",
            "registry.gate.thresholds", "loss.loss_weights", "train.peak_tflops", "loss.ld_alpha"} <= non_finite
    assert {"train.seed", "eval.seed", "data.shuffle_seed"} <= {c.values[0] for c in CASES if "-range--1" in c.id}


@pytest.mark.parametrize("path,value", CASES)
def test_bad_value_fails_at_load_naming_the_field(path, value):
    with pytest.raises(ConfigError) as err:
        load_config(None, {path: value})
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("config error: ")
    assert path in msg, msg


@pytest.mark.parametrize("path,value", CASES[::7])
def test_bad_value_stops_the_flow_before_any_compute(path, value, dpo_home, monkeypatch):
    import dpo_engine.pipeline as pipeline_mod
    import flows.dpo as flow_mod

    def never(*a, **k):
        raise AssertionError("compute started with a bad config")
    for name in ("preflight", "new_run_dir", "nothing_new"):
        monkeypatch.setattr(pipeline_mod if name == "preflight" else flow_mod, name, never)
    with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
        flow_mod.dpo.fn(overrides={path: value})
    assert not (dpo_home / "runs").exists()


@pytest.mark.parametrize("field,overrides", VALIDATOR_PARAMS)
def test_validator_rule_fails_at_load_naming_the_field(field, overrides):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("config error: ")
    assert field in msg, msg


@pytest.mark.parametrize("field,overrides", VALIDATOR_PARAMS[::3])
def test_validator_rule_stops_the_flow_before_any_compute(field, overrides, dpo_home, monkeypatch):
    _no_compute(monkeypatch, "preflight", "new_run_dir", "nothing_new")
    import flows.dpo as flow_mod

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        flow_mod.dpo.fn(overrides=overrides)
    assert not (dpo_home / "runs").exists()


@pytest.mark.parametrize("item", ["train.learning_rate=inf", "train.learning_rate=.inf", "train.learning_rate=nan",
                                  "registry.retry_timeout_s=.inf", "registry.gate.min_improvement=.nan",
                                  "registry.gate.thresholds={eval/win_rate: .nan}", "loss.loss_weights=[-.inf]"])
def test_non_finite_values_from_the_command_line_fail(item):
    with pytest.raises(ConfigError, match=item.split("=")[0].replace(".", r"\.")):
        load_config(None, [item])


def test_sound_values_next_to_the_new_rules_still_load():
    for ok in ({"run_name": "night-1"}, {"run_name": "a.b_c-1"}, {"run_name": "x" * 128}, {"run_name": "2026-11-22"},
               {"peft.peft_type": "lora"}, {"peft.peft_type": "IA3"}, {"train.seed": 0}, {"train.seed": 2**32 - 1},
               {"train.early_stopping_metric": "eval/rewards/accuracies", "train.eval_steps": 5},
               {"train.early_stopping_metric": "loss", "train.early_stopping_mode": "min"},
               {"registry.model_name": "my.model_v2"}, {"registry.gate.min_improvement": -0.5},
               {"registry.gate.thresholds": {"eval/win_rate": 0.5}}, {"train.max_steps": -1}):
        load_config(None, ok)
    assert load_config(None, {"registry.model_name": " spaced "}).registry.model_name == "spaced"
    load_config(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")


def test_early_stopping_names_are_what_the_trainer_logs(tmp_path):
    """The closed set train.early_stopping_metric is checked against is what a (tiny) training with
    periodic evaluation writes into its history, and what a sweep's stop rule may compare."""
    from test_trainer import _load, _pairs
    from tiny import tiny_model_dir

    from data_contracts.config import LossConfig, TrainConfig
    from dpo_engine.evaluation import preference_metrics
    from dpo_engine.reference import compute_reference_logps
    from dpo_engine.sweep import STOP_METRICS
    from dpo_engine.training import train

    model = _load(tiny_model_dir(tmp_path / "m"))
    pairs, eval_pairs = _pairs(n=4, seed=0), _pairs(n=4, seed=1)
    eval_pairs["example_id"] = [f"ev{i}" for i in range(len(eval_pairs))]
    ref, eval_ref = (compute_reference_logps(model, p, pad_id=0, batch_size=4) for p in (pairs, eval_pairs))
    cfg = TrainConfig(max_steps=2, eval_steps=1, per_device_train_batch_size=4, seed=1,
                      early_stopping_metric="eval/loss", early_stopping_mode="min")
    res = train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=tmp_path / "run",
                evaluate_fn=lambda step: preference_metrics(model, eval_pairs, eval_ref, loss_cfg=LossConfig(),
                                                            pad_id=0, batch_size=4))
    logged = {k for h in res.history for k in h} - {"step"}
    assert logged <= set(EVAL_STEP_METRICS + TRAIN_STEP_METRICS), logged - set(EVAL_STEP_METRICS + TRAIN_STEP_METRICS)
    assert set(EVAL_STEP_METRICS) | set(PAIR_METRICS) <= logged
    assert set(STOP_METRICS) == set(EVAL_STEP_METRICS)


def test_peft_type_names_are_pefts_enum():
    from data_contracts.config.model import peft_type_names_from_source as _peft_type_names_from_source

    import peft

    assert _peft_type_names_from_source() == {m.name for m in peft.PeftType}


# ------------------------------------------------------------------------------ preflight: local files

# (field named in the message, overrides; {tmp} is a fresh folder). The config loads (a saved config
# must load on any machine); preflight, before the run folder exists, finds what is missing here.
PREFLIGHT_CASES = [
    ("model.chat_template_path", {"model.chat_template_path": "{tmp}/nope.jinja"}),
    ("train.accelerate_config", {"train.accelerate_config": "{tmp}/nope.yaml"}),
    ("train.accelerate_config", {"train.accelerate_config": "{tmp}/list.yaml"}),  # not a mapping
    ("model.name_or_path", {"model.name_or_path": "{tmp}/no-model"}),
    ("model.name_or_path", {"model.name_or_path": "builtin:nosuch"}),
    ("model.tokenizer", {"model.tokenizer": "./no/such/tokenizer"}),
    ("reference.model_path", {"reference.model_path": "~/no/such/reference-model"}),
    ("peft.adapter_path", {"peft.enabled": True, "peft.adapter_path": "{tmp}"}),  # no adapter_config.json
    ("peft.adapter_path", {"peft.adapter_path": "{tmp}"}),  # set, but peft.enabled is false
    ("reference.source", {"reference.source": "adapter_disabled"}),  # needs peft.enabled
    ("data.source", {"data.source": "{tmp}/no-data.jsonl"}),
    ("data.format", {"data.format": "nosuch"}),
]


def _fill(overrides: dict, tmp: Path) -> dict:
    (tmp / "list.yaml").write_text("- not\n- a mapping\n")
    return {k: v.replace("{tmp}", str(tmp)) if isinstance(v, str) else v for k, v in overrides.items()}


def _no_compute(monkeypatch, *names):
    import dpo_engine.pipeline as pipeline_mod
    import flows.dpo as flow_mod

    def never(*a, **k):
        raise AssertionError("compute started with a bad config")
    for name in names:
        monkeypatch.setattr(pipeline_mod if name == "preflight" else flow_mod, name, never)
    for stage in ("validate", "precompute", "train", "evaluate", "register"):
        monkeypatch.setattr(flow_mod.t, stage, never)


@pytest.mark.parametrize("field,overrides", [pytest.param(f, o, id=f"{f}-{i}")
                                             for i, (f, o) in enumerate(PREFLIGHT_CASES)])
def test_missing_local_file_fails_in_preflight_before_any_compute(field, overrides, dpo_home, tmp_path, monkeypatch):
    overrides = {**_fill(overrides, tmp_path), "eval.judge": None, "registry.enabled": False}
    load_config(None, overrides)  # loads: the check belongs to the machine that runs it
    _no_compute(monkeypatch, "new_run_dir", "nothing_new")
    import flows.dpo as flow_mod

    with pytest.raises(ConfigError) as err:
        flow_mod.dpo.fn(overrides=overrides)
    msg = str(err.value)
    assert "\n" not in msg and field in msg, msg
    assert not (dpo_home / "runs").exists()


def test_preflight_passes_when_the_local_files_exist(dpo_home, tmp_path):
    from dpo_engine.pipeline import preflight

    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (tmp_path / "acc.yaml").write_text("distributed_type: NO\nnum_processes: 1\n")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")  # presence is what preflight checks
    preflight(load_config(None, {"model.chat_template_path": str(tmp_path / "t.jinja"),
                                 "train.accelerate_config": str(tmp_path / "acc.yaml"),
                                 "model.tokenizer": str(tmp_path), "peft.enabled": True,
                                 "peft.adapter_path": str(tmp_path / "adapter"),
                                 "eval.judge": None, "registry.enabled": False}))
