"""The whole dpo flow on a tiny model built in the test: five stages, outputs, MLflow, retries, reuse."""

import json
from pathlib import Path

import pandas as pd
import pytest

from tiny import tiny_model_dir


def _overrides(model_dir, **extra):
    return {"model.name_or_path": str(model_dir), "data.train_limit": 12, "data.eval_limit": 6,
            "data.max_length": 256, "train.per_device_train_batch_size": 4, "train.max_steps": 3,
            "train.learning_rate": 1e-3, "train.save_steps": 1, "train.logging_steps": 2, "eval.num_prompts": 3,
            "eval.max_new_tokens": 4, "eval.batch_size": 4, "reference.batch_size": 8,
            "registry.model_name": "tiny-e2e", "registry.gate.thresholds": {}, **extra}


@pytest.fixture
def tiny(tmp_path):
    return tiny_model_dir(tmp_path / "tiny-model")


def test_flow_runs_five_stages_and_registers(dpo_home, tiny):
    from flows.dpo import dpo
    from dpo_engine import tracking as registry
    from data_contracts.state import mlflow_uri

    summary = dpo(overrides=_overrides(tiny), run_name="e2e")
    assert summary["status"] == "completed"
    assert [s["status"] for s in summary["stages"].values()] == ["completed"] * 5
    run_dir = Path(summary["run_dir"])
    assert json.loads((run_dir / "summary.json").read_text())["registered_version"] == summary["registered_version"]

    valid = pd.read_parquet(run_dir / "validate" / "train" / "valid.parquet")
    from dpo_engine.reference import read_cache
    pre = json.loads((run_dir / "precompute.json").read_text())
    ref = read_cache(Path(pre["train_ref"]))
    assert len(valid) == 12 and sorted(ref["example_id"]) == sorted(valid["example_id"])

    registry.connect(mlflow_uri())
    from mlflow import MlflowClient
    hist = MlflowClient().get_metric_history(summary["mlflow_run_id"], "rewards/margins")
    assert [m.step for m in hist] == [2, 3]  # every train.logging_steps steps, and the last
    every = json.loads((run_dir / "train" / "history.json").read_text())  # every step's own metrics
    assert hist[0].value == pytest.approx((every[0]["rewards/margins"] + every[1]["rewards/margins"]) / 2)
    assert hist[1].value == pytest.approx(every[2]["rewards/margins"])
    assert "eval/rewards/accuracies" in MlflowClient().get_run(summary["mlflow_run_id"]).data.metrics

    assert summary["registered_version"] == 1 and "challenger" in summary["aliases"]
    model, tok = registry.load_registered("models:/tiny-e2e@challenger")
    assert model.config.vocab_size == len(tok)


def test_failed_stage_is_retried_and_reruns_reuse_earlier_stages(dpo_home, tiny, monkeypatch):
    from dpo_engine import stages
    from flows.dpo import dpo

    calls = {"validate": 0, "precompute": 0, "train": 0}
    for name in calls:
        real = getattr(stages, name).run

        def wrapped(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            if _name == "train" and calls["train"] == 1:
                raise RuntimeError("injected failure in train")
            return _real(*a, **kw)
        monkeypatch.setattr(getattr(stages, name), "run", wrapped)

    s1 = dpo(overrides=_overrides(tiny), run_name="retry")
    assert s1["status"] == "completed"
    assert calls == {"validate": 1, "precompute": 1, "train": 2}  # retried, nothing before it redone

    # only the learning rate changes: validate and precompute are reused, not recomputed
    s2 = dpo(overrides=_overrides(tiny, **{"train.learning_rate": 5e-4}), run_name="retry-lr")
    st = {k: v["status"] for k, v in s2["stages"].items()}
    assert st["validate"] == st["precompute"] == "reused"
    assert st["train"] == "completed"
    assert calls["train"] == 3
    assert s2["registered_version"] == 2


def test_bad_config_fails_before_compute(dpo_home):
    from data_contracts.config import ConfigError
    from flows.dpo import dpo

    with pytest.raises(ConfigError, match="train.learning_rate"):
        dpo.fn(overrides={"train.learning_rate": "fast"})


def test_a_rerun_under_the_same_name_with_new_inputs_never_resumes_the_other_training(dpo_home, tiny):
    """Same --run-name, changed config: the second training starts from step 0 in a new MLflow run and
    registers its own version; the first one's folder is kept aside, not resumed."""
    from flows.dpo import dpo

    s1 = dpo(overrides=_overrides(tiny), run_name="same")
    t1 = json.loads((Path(s1["run_dir"]) / "train.json").read_text())
    s2 = dpo(overrides=_overrides(tiny, **{"train.learning_rate": 5e-4}), run_name="same")
    t2 = json.loads((Path(s2["run_dir"]) / "train.json").read_text())
    assert s1["run_dir"] == s2["run_dir"] and t1["fingerprint"] != t2["fingerprint"]
    assert t2["resumed_from"] == 0 and t2["mlflow_run_id"] != t1["mlflow_run_id"]
    assert s2["registered_version"] != s1["registered_version"]
    assert [p.name.split("-")[1] for p in Path(s2["run_dir"]).glob("train.other-*")] == [t1["fingerprint"]]
    s3 = dpo(overrides=_overrides(tiny, **{"train.learning_rate": 5e-4}), run_name="same")  # same again: reused
    assert json.loads((Path(s3["run_dir"]) / "train.json").read_text())["mlflow_run_id"] == t2["mlflow_run_id"]
