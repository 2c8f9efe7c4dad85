"""Best checkpoint selection (issue 18), as transformers' Trainer: ``train.metric_for_best_model`` /
``greater_is_better`` over the periodic evaluations; the best checkpoint survives the pruning, is
recorded in the checkpoints' state (a resume keeps it), and with ``load_best_model_at_end`` its
weights, not the last step's, are the model's at the end (train/model, what evaluate and register read)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from data_contracts.config import ConfigError, LossConfig, TrainConfig, load_config
from dpo_engine.reference import compute_reference_logps
from dpo_engine.training import train
from dpo_engine.training.best import best_settings
from test_trainer import _pairs
from tiny import tiny_model_dir

# eval/loss per step: best (lowest) at step 2; a tie at step 5 does not replace it (strictly better only)
LOSSES = {1: 0.9, 2: 0.5, 3: 0.7, 4: 0.8, 5: 0.5, 6: 0.9}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tiny_model_dir(tmp_path_factory.mktemp("best") / "m")
    pairs = _pairs(n=8)
    return d, pairs, compute_reference_logps(_load(d), pairs, pad_id=0, batch_size=8)


def _load(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)


def _fake_eval(values, seen=None):
    def evaluate(step):
        if seen is not None:
            seen.append(step)
        return {"eval/loss": values[step], "eval/rewards/accuracies": 1.0 - values[step]}
    return evaluate


def _cfg(**kw):
    return TrainConfig(**{"learning_rate": 1e-2, "max_steps": 6, "seed": 2, "per_device_train_batch_size": 4,
                          "eval_steps": 1, "save_steps": 1, "save_total_limit": 2, **kw})


def _train(setup, out, values=LOSSES, progress=None, **kw):
    d, pairs, ref = setup
    model = _load(d)
    res = train(model, pairs, ref, loss_cfg=LossConfig(), cfg=_cfg(**kw), pad_id=0, out_dir=out,
                evaluate_fn=_fake_eval(values), progress=progress)
    return model, res


def _same(model, folder: Path) -> bool:
    saved = load_file(folder / "model.safetensors")
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in saved.items())


def _steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in ckpt.glob("step-*"))


def test_load_best_model_at_end_restores_the_best_checkpoint_and_pruning_keeps_it(setup, tmp_path):
    model, res = _train(setup, tmp_path, load_best_model_at_end=True)
    ckpt = tmp_path / "checkpoints"
    assert res.steps == 6
    assert {k: res.best[k] for k in ("step", "metric", "value", "greater_is_better", "loaded")} == \
        {"step": 2, "metric": "eval/loss", "value": 0.5, "greater_is_better": False, "loaded": True}
    assert res.best["checkpoint"] == str(ckpt / "step-2")
    assert _steps(ckpt) == [2, 6]  # save_total_limit=2: the best and the newest
    assert _same(model, ckpt / "step-2") and not _same(model, ckpt / "step-6")  # the best weights, not the last
    state = json.loads((ckpt / "step-6" / "state.json").read_text())
    assert state["best"] == {"step": 2, "metric": "eval/loss", "value": 0.5, "greater_is_better": False}


def test_without_load_best_the_last_weights_stay_and_the_best_is_still_kept(setup, tmp_path):
    model, res = _train(setup, tmp_path, metric_for_best_model="rewards/accuracies", save_total_limit=1)
    ckpt = tmp_path / "checkpoints"
    assert res.best["metric"] == "eval/rewards/accuracies" and res.best["greater_is_better"] is True
    assert res.best["step"] == 2 and res.best["loaded"] is False
    assert _steps(ckpt) == [2, 6]  # limit 1: the best and the newest (a resume needs the newest)
    assert _same(model, ckpt / "step-6")
    # no best selection: plain pruning, the newest save_total_limit
    _, res = _train(setup, tmp_path / "plain")
    assert res.best is None and _steps(tmp_path / "plain" / "checkpoints") == [5, 6]


def test_a_resumed_training_keeps_the_best_so_far(setup, tmp_path):
    def kill_at(n):
        def progress(step, metrics):
            if step == n:
                raise KeyboardInterrupt
        return progress

    with pytest.raises(KeyboardInterrupt):  # killed at step 5, after step 4's checkpoint
        _train(setup, tmp_path, load_best_model_at_end=True, progress=kill_at(5))
    assert _steps(tmp_path / "checkpoints") == [2, 4]
    model, res = _train(setup, tmp_path, load_best_model_at_end=True)
    assert res.resumed_from == 4 and res.best["step"] == 2 and res.best["loaded"]
    assert _same(model, tmp_path / "checkpoints" / "step-2")
    # a new best after the resume replaces it, and the old best is pruned
    better = {**LOSSES, 5: 0.1}
    with pytest.raises(KeyboardInterrupt):
        _train(setup, tmp_path / "newbest", better, load_best_model_at_end=True, progress=kill_at(5))
    model, res = _train(setup, tmp_path / "newbest", better, load_best_model_at_end=True)
    assert res.best["step"] == 5 and _steps(tmp_path / "newbest" / "checkpoints") == [5, 6]
    assert _same(model, tmp_path / "newbest" / "checkpoints" / "step-5")


def test_config_errors_and_defaults():
    s = best_settings
    assert s(TrainConfig()) is None
    assert s(TrainConfig(load_best_model_at_end=True, eval_steps=2, save_steps=4)) == ("eval/loss", False)
    assert s(TrainConfig(metric_for_best_model="eval/rewards/margins", eval_steps=2)) == ("eval/rewards/margins", True)
    assert s(TrainConfig(metric_for_best_model="loss", eval_steps=2, greater_is_better=True)) == ("eval/loss", True)
    for over, words in [({"train.load_best_model_at_end": True}, ["train.load_best_model_at_end", "eval_steps > 0"]),
                        ({"train.metric_for_best_model": "eval/loss"}, ["train.metric_for_best_model", "eval_steps"]),
                        ({"train.load_best_model_at_end": True, "train.eval_steps": 3, "train.save_steps": 4},
                         ["multiple of train.eval_steps (3)", "save_steps (4)"]),
                        ({"train.load_best_model_at_end": True, "train.eval_steps": 3},
                         ["save_steps (0)"]),
                        ({"train.metric_for_best_model": "eval/win_rate", "train.eval_steps": 3},
                         ["train.metric_for_best_model", "eval/rewards/accuracies"])]:
        with pytest.raises(ConfigError) as e:
            load_config(overrides=over)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("config error: train"), msg
        for w in words:
            assert w in msg, (w, msg)
    load_config(overrides={"train.load_best_model_at_end": True, "train.eval_steps": 3, "train.save_steps": 6})
    # a TRL/transformers config carries them over, with transformers' metric spelling
    from data_contracts.config import RunConfig
    from data_contracts.config.trl import from_trl
    trl = from_trl({"eval_strategy": "steps", "eval_steps": 2, "save_strategy": "steps", "save_steps": 4,
                    "load_best_model_at_end": True, "metric_for_best_model": "eval_rewards/accuracies"}, echo=False)
    t = RunConfig(**trl).train
    assert (t.load_best_model_at_end, t.metric_for_best_model, best_settings(t)) == \
        (True, "eval/rewards/accuracies", ("eval/rewards/accuracies", True))


def test_train_stage_exports_the_best_checkpoint_and_logs_it(dpo_home, setup, monkeypatch):
    """The stage: train/model holds the best checkpoint's weights; the result and its summary name the
    best step and value; MLflow gets best_step and best_metric."""
    from dpo_engine.stages import precompute, train as train_stage, validate

    d = setup[0]
    cfg = load_config(overrides={
        "model.name_or_path": str(d), "data.train_limit": 8, "data.eval_limit": 4, "data.max_length": 256,
        "train.per_device_train_batch_size": 4, "train.max_steps": 4, "train.learning_rate": 1e-2,
        "train.eval_steps": 1, "train.save_steps": 1, "train.load_best_model_at_end": True,
        "registry.experiment": "best"})
    run_dir = dpo_home / "runs" / "best"
    run_dir.mkdir(parents=True)
    v = validate.run(cfg, run_dir)
    pre = precompute.run(cfg, run_dir, v)
    seen = []
    monkeypatch.setattr(train_stage, "eval_callback", lambda *a, **k: _fake_eval(LOSSES, seen))
    res = train_stage.run(cfg, run_dir, v, pre)
    assert seen == [1, 2, 3, 4]
    assert res["best"]["step"] == 2 and res["best"]["value"] == 0.5 and res["best"]["loaded"]
    assert "best eval/loss 0.5000 at step 2 (exported)" in res["summary"]
    ckpt = run_dir / "train" / "checkpoints"
    exported = load_file(Path(res["model_dir"]) / "model.safetensors")
    for step, equal in ((2, True), (4, False)):
        saved = load_file(ckpt / f"step-{step}" / "model.safetensors")
        assert all(torch.equal(exported[k], t) for k, t in saved.items()) == equal, step

    from mlflow.tracking import MlflowClient
    from data_contracts.state import mlflow_uri
    from dpo_engine.tracking import Outbox
    Outbox(res["mlflow_run_id"]).send(wait=True)  # what the register stage does with what is pending
    metrics = MlflowClient(mlflow_uri(cfg)).get_run(res["mlflow_run_id"]).data.metrics
    assert metrics["best_step"] == 2 and metrics["best_metric"] == 0.5
