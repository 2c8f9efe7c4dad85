"""The grid sweep: grid expansion, best pick, and a two-variant sweep on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny import tiny_model_dir

from data_contracts.config import ConfigError
from dpo_engine.sweep import best_index, expand_grid


def test_expand_grid_is_the_cartesian_product():
    assert expand_grid({"loss.beta": [0.1, 0.2], "train.learning_rate": [1e-3]}) == [
        {"loss.beta": 0.1, "train.learning_rate": 1e-3}, {"loss.beta": 0.2, "train.learning_rate": 1e-3}]
    with pytest.raises(ConfigError, match="empty"):
        expand_grid({})
    with pytest.raises(ConfigError, match="data.max_length: only"):
        expand_grid({"data.max_length": [128]})
    with pytest.raises(ConfigError, match="non-empty list"):
        expand_grid({"loss.beta": []})


def test_best_index_ignores_missing_and_nan():
    assert best_index([{"m": 0.2}, {"m": float("nan")}, {"m": 0.5}, {}], "m") == 2
    with pytest.raises(ValueError, match="no variant has metric"):
        best_index([{}, {"m": float("nan")}], "m")


def test_parse_grid():
    from flows.cli import parse_grid

    assert parse_grid(["loss.beta=0.1,0.3", "loss.loss_type=sigmoid,ipo"]) == \
        {"loss.beta": [0.1, 0.3], "loss.loss_type": ["sigmoid", "ipo"]}
    with pytest.raises(ConfigError, match="section.field=v1,v2"):
        parse_grid(["loss.beta"])


def test_sweep_trains_children_under_one_parent_and_registers_the_best(dpo_home, tmp_path):
    from mlflow import MlflowClient

    from data_contracts.config import mlflow_uri
    from dpo_engine import registry
    from flows.dpo import dpo

    tiny = tiny_model_dir(tmp_path / "tiny-model")
    overrides = {"model.name_or_path": str(tiny), "data.train_limit": 12, "data.eval_limit": 6,
                 "data.max_length": 256, "train.per_device_train_batch_size": 4, "train.max_steps": 2,
                 "train.learning_rate": 1e-3, "eval.num_prompts": 2, "eval.max_new_tokens": 4,
                 "eval.batch_size": 4, "reference.batch_size": 8, "registry.experiment": "sweep-test",
                 "registry.model_name": "tiny-sweep", "registry.gate.thresholds": {}}
    s = dpo(overrides=overrides, run_name="sw", grid={"loss.beta": [0.1, 0.5]},
            metric="eval/rewards/margins")

    assert len(s["variants"]) == 2 and s["registered_version"] == 1
    margins = [v["eval/rewards/margins"] for v in s["variants"]]
    assert s["best"] == margins.index(max(margins))
    assert json.loads((Path(s["run_dir"]) / "summary.json").read_text())["best"] == s["best"]

    registry.connect(mlflow_uri())
    client = MlflowClient()
    children = [v["mlflow_run_id"] for v in s["variants"]]
    assert len(set(children)) == 2
    for i, rid in enumerate(children):
        run = client.get_run(rid)
        assert run.data.tags["mlflow.parentRunId"] == s["mlflow_parent_run_id"]
        assert run.data.tags["dpo.sweep.loss.beta"] == str([0.1, 0.5][i])
        assert run.info.status == "FINISHED"
    parent = client.get_run(s["mlflow_parent_run_id"])
    assert parent.data.tags["dpo.sweep.best_run_id"] == children[s["best"]]
    versions = client.search_model_versions("name = 'tiny-sweep'")
    assert [v.run_id for v in versions] == [children[s["best"]]]  # only the best is registered
