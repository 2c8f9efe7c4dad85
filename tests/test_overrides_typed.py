"""`--set` values are parsed once, as YAML, and reach the flow typed (issue 16): `dpo run`, `dpo sweep`
and a deployment run's `overrides` parameter all give the flow the same typed values."""

import pytest
from prefect.cli._utilities import load_json_key_values

import dpo_engine.pipeline
import dpo_engine.sweep.plan
import flows.commands
import flows.dpo
import flows.sweep
from data_contracts.config import load_config, parse_overrides
from flows.cli import main

# (--set item, the field it sets, the typed value the config must hold): every YAML type
CASES = [
    ("peft.target_modules=[q_proj,v_proj]", ("peft", "target_modules"), ["q_proj", "v_proj"]),
    ("data.eval_source=null", ("data", "eval_source"), None),
    ("data.eval_source=~", ("data", "eval_source"), None),
    ("loss.loss_type=[sigmoid,sft]", ("loss", "loss_type"), ["sigmoid", "sft"]),
    ("loss.loss_weights=[1.0, 0.5]", ("loss", "loss_weights"), [1.0, 0.5]),
    ("train.gradient_checkpointing=true", ("train", "gradient_checkpointing"), True),
    ("train.max_steps=7", ("train", "max_steps"), 7),
    ("train.learning_rate=3e-6", ("train", "learning_rate"), 3e-6),
    ("registry.gate.thresholds={eval/win_rate: 0.6}", ("registry", "gate", "thresholds"), {"eval/win_rate": 0.6}),
    ("data.source='null'", ("data", "source"), "null"),  # a quoted YAML string stays a string
]
ITEMS = [c[0] for c in CASES]


def _field(cfg, path):
    node = cfg
    for p in path:
        node = node[p] if isinstance(node, dict) else getattr(node, p)
    return node


def _check(overrides: dict) -> None:
    cfg = load_config(None, {k: v for k, v in overrides.items() if k != "data.source"})
    for item, path, want in CASES:
        if path != ("data", "source"):
            assert _field(cfg, path) == want, item
    assert overrides["data.source"] == "null"


@pytest.fixture
def captured(monkeypatch, tmp_path):
    """What the flow is called with, by `dpo run` / `dpo sweep` (Prefect and the checks stubbed)."""
    seen = {}

    def fake_dpo(**kw):
        seen.update(kw)
        return {"status": "skipped", "reason": "stub", "run_dir": str(tmp_path), "variants": [], "best": None,
                "metric": "eval/win_rate", "mlflow_parent_run_id": "-"}

    monkeypatch.setattr(flows.dpo, "dpo", fake_dpo)
    monkeypatch.setattr(flows.sweep, "dpo_sweep", fake_dpo)
    monkeypatch.setattr(dpo_engine.pipeline, "prepare", lambda *a, **k: load_config())
    monkeypatch.setattr(dpo_engine.sweep.plan, "variant_configs", lambda *a, **k: None)
    monkeypatch.setattr(flows.commands, "check_prefect_api", lambda: None)
    return seen


def test_parse_overrides_types_every_yaml_value():
    _check(parse_overrides(ITEMS))


def test_dpo_run_hands_the_flow_typed_values(captured):
    assert main(["run", *[a for i in ITEMS for a in ("--set", i)]]) == 0
    _check(captured["overrides"])


def test_dpo_sweep_hands_the_flow_typed_values(captured):
    assert main(["sweep", "--grid", "loss.beta=0.1,0.2", *[a for i in ITEMS for a in ("--set", i)]]) == 0
    _check(captured["overrides"])


def test_deployment_run_overrides_parameter_is_typed():
    """`prefect deployment run dpo/full --param overrides='{...}'`: Prefect's CLI reads the value as
    JSON and the flow's parameter schema keeps it as is."""
    params = load_json_key_values(['overrides={"peft.target_modules": ["q_proj", "v_proj"], '
                                   '"data.eval_source": null, "train.max_steps": 7, '
                                   '"train.gradient_checkpointing": true, "train.learning_rate": 3e-6}'], "parameter")
    checked = flows.dpo.dpo.validate_parameters(params)
    cfg = load_config(None, checked["overrides"])
    assert cfg.peft.target_modules == ["q_proj", "v_proj"] and cfg.data.eval_source is None
    assert (cfg.train.max_steps, cfg.train.gradient_checkpointing, cfg.train.learning_rate) == (7, True, 3e-6)
