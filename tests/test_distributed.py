"""Several processes through `accelerate launch` (torchrun, gloo on the CPU).

The train stage with train.num_processes=2 x batch 4 ends with the weights of one process x batch 8
(within 1e-5 after 5 steps). The launched precompute stage: tests/test_distributed_precompute.py.
"""

import json
from pathlib import Path

import pytest
import torch

from data_contracts.config import ConfigError, load_config
from tiny import tiny_model_dir

STEPS = 5


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _overrides(model_dir, **kw):
    return {"model.name_or_path": str(model_dir), "data.train_limit": 12, "data.eval_limit": 4,
            "data.max_length": 256, "train.learning_rate": 1e-3, "train.max_steps": STEPS,
            "train.seed": 1, "train.padding_free": True, "train.per_device_train_batch_size": 4,
            "train.num_processes": 2, "reference.batch_size": 8, "registry.experiment": "distributed", **kw}


def test_two_launched_processes_match_one_process_with_the_global_batch(dpo_home, tmp_path):
    """The train stage through `accelerate launch` (2 gloo ranks x batch 4) == 1 process x batch 8."""
    launched_matches_single(dpo_home, tmp_path)


def launched_matches_single(dpo_home, tmp_path, **launch_overrides):
    """Train through the launch path (2 ranks x batch 4, plus ``launch_overrides``) and compare with one
    process x batch 8: weights within 1e-5, step metrics gathered over both ranks, reuse on a re-run."""
    from data_contracts.config import ModelConfig
    from dpo_engine.modeling import load_model
    from dpo_engine.reference import read_cache
    from dpo_engine.stages import precompute, train as train_stage, validate
    from data_contracts.validation import read_valid
    from dpo_engine.training import train

    model_dir = tiny_model_dir(tmp_path / "m")
    cfg = load_config(overrides=_overrides(model_dir, **launch_overrides))
    one = load_config(overrides=_overrides(model_dir, **{"train.num_processes": 1,
                                                         "train.per_device_train_batch_size": 8}))
    run_dir = dpo_home / "runs" / "two"
    run_dir.mkdir(parents=True)
    v = validate.run(one, run_dir)
    pre = precompute.run(one, run_dir, v)  # one process here: test_distributed_precompute launches it

    res = train_stage.run(cfg, run_dir, v, pre)
    assert res["steps"] == STEPS and (run_dir / "train" / "launch" / "result.json").is_file()
    launched = load_model(ModelConfig(), res["model_dir"])
    single = load_model(ModelConfig(), str(model_dir))
    base = _flat(single)
    pairs = read_valid(v["train"]["valid"])
    hist = train(single, pairs, read_cache(Path(pre["train_ref"])), loss_cfg=one.loss, cfg=one.train, pad_id=0,
                 out_dir=tmp_path / "single").history
    assert torch.allclose(_flat(launched), _flat(single), atol=1e-5)
    assert not torch.allclose(_flat(single), base, atol=1e-4)  # training moved the weights
    # rank 0's logged metrics cover both ranks' pairs
    launched_hist = json.loads(Path(res["history"]).read_text())
    for key in ("loss", "rewards/accuracies", "logps/chosen", "num_tokens"):
        assert launched_hist[0][key] == pytest.approx(hist[0][key], abs=1e-5), key
    # a re-run is reused without launching again
    assert train_stage.run(cfg, run_dir, v, pre)["reused"] is True


def test_launch_command_and_config_errors(tmp_path, monkeypatch):
    from dpo_engine.stages import launch

    cfg = load_config(overrides={"train.num_processes": 2})
    assert launch.wants_launch(cfg)
    cmd = launch.launch_command(cfg, tmp_path / "spec.json")
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd
    assert cmd[-3:] == ["-m", "dpo_engine.stages.rank", str(tmp_path / "spec.json")]
    assert not launch.wants_launch(load_config())

    conf = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    cmd = launch.launch_command(load_config(overrides={"train.accelerate_config": str(conf)}), tmp_path / "s")
    assert cmd[cmd.index("--config_file") + 1] == str(conf) and "--multi_gpu" not in cmd
    assert "--num_processes" not in cmd  # the config file's own

    missing = load_config(overrides={"train.accelerate_config": str(tmp_path / "nope.yaml")})
    with pytest.raises(ConfigError, match="train.accelerate_config: file not found"):
        launch.launch_command(missing, tmp_path / "s")
    with pytest.raises(ConfigError, match="train.num_processes"):
        load_config(overrides={"train.num_processes": 0})

    monkeypatch.setenv(launch.WORKER_ENV, "1")  # inside a launched rank the stage runs, never launches
    assert not launch.wants_launch(cfg)


def test_a_rank_s_user_error_comes_back_as_one_line(tmp_path):
    from dpo_engine.stages import launch
    from dpo_engine.modeling import ModelError

    err = {"rank": 1, "type": "ModelError", "message": "cannot load model 'x': no such folder"}
    with pytest.raises(ModelError, match=r"^cannot load model 'x': no such folder \(rank 1 of the launched train"):
        launch._reraise(err, "train")
    with pytest.raises(launch.LaunchError, match="KeyError"):
        launch._reraise({"rank": 0, "type": "KeyError", "message": "boom"}, "train")
