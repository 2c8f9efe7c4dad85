"""Sweeps: grid and list expansion, best pick, and sweeps on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweep_fakes import fake_sweep
from tiny import tiny_model_dir

from data_contracts.config import ConfigError
from dpo_engine.sweep import best_index, expand_grid


@pytest.fixture(autouse=True)
def _slow_server_start():
    import flows  # noqa: F401  (the project-local Prefect state, before prefect is imported)
    import prefect.settings as ps

    # a loaded 2-core machine can take longer than Prefect's 20 s to start its temporary server
    with ps.temporary_settings(updates={ps.PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        yield


def test_expand_grid_is_the_cartesian_product():
    assert expand_grid({"loss.beta": [0.1, 0.2], "train.learning_rate": [1e-3]}) == [
        {"loss.beta": 0.1, "train.learning_rate": 1e-3}, {"loss.beta": 0.2, "train.learning_rate": 1e-3}]
    with pytest.raises(ConfigError, match="empty"):
        expand_grid({})
    with pytest.raises(ConfigError, match="data.max_length: only"):
        expand_grid({"data.max_length": [128]})
    with pytest.raises(ConfigError, match="non-empty list"):
        expand_grid({"loss.beta": []})


def test_expand_a_list_of_variants():
    variants = [{"loss.beta": 0.1}, {"loss.beta": 0.3, "loss.loss_type": "ipo"}]
    assert expand_grid(variants) == variants
    with pytest.raises(ConfigError, match="list of variants is empty"):
        expand_grid([])
    with pytest.raises(ConfigError, match="variant 1: needs a non-empty mapping"):
        expand_grid([{"loss.beta": 0.1}, {}])
    with pytest.raises(ConfigError, match="data.max_length: only"):
        expand_grid([{"data.max_length": 128}])
    with pytest.raises(ConfigError, match="variant 1 repeats variant 0"):
        expand_grid([{"loss.beta": 0.1}, {"loss.beta": 0.1}])


def test_best_index_ignores_missing_and_nan():
    assert best_index([{"m": 0.2}, {"m": float("nan")}, {"m": 0.5}, {}], "m") == 2
    assert best_index([{"m": 0.9}, {"m": 0.5}, {}], "m", among=[1, 2]) == 1  # 0 was stopped early
    with pytest.raises(ValueError, match="no variant has metric"):
        best_index([{}, {"m": float("nan")}], "m")


def test_parse_grid():
    from dpo_engine.sweep import parse_grid

    assert parse_grid(["loss.beta=0.1,0.3", "loss.loss_type=sigmoid,ipo"]) == \
        {"loss.beta": [0.1, 0.3], "loss.loss_type": ["sigmoid", "ipo"]}
    with pytest.raises(ConfigError, match="section.field=v1,v2"):
        parse_grid(["loss.beta"])


def test_parse_variant_and_grid_or_variant():
    import argparse

    from dpo_engine.sweep import parse_variant
    from flows.commands import sweep_grid

    assert parse_variant("loss.beta=0.1,loss.loss_type=[sigmoid,sft],train.learning_rate=5.0e-6") == \
        {"loss.beta": 0.1, "loss.loss_type": ["sigmoid", "sft"], "train.learning_rate": 5e-6}
    with pytest.raises(ConfigError, match="section.field=v"):
        parse_variant("loss.beta")
    args = argparse.Namespace(grid=[], variant=["loss.beta=0.1", "loss.beta=0.2,loss.loss_type=ipo"])
    assert sweep_grid(args) == [{"loss.beta": 0.1}, {"loss.beta": 0.2, "loss.loss_type": "ipo"}]
    for grid, variant in (([], []), (["loss.beta=0.1,0.2"], ["loss.beta=0.3"])):
        with pytest.raises(ConfigError, match="either --grid .* or --variant"):
            sweep_grid(argparse.Namespace(grid=grid, variant=variant))


def _tiny_overrides(tmp_path, name: str) -> dict:
    tiny = tiny_model_dir(tmp_path / "tiny-model")
    return {"model.name_or_path": str(tiny), "data.train_limit": 12, "data.eval_limit": 6,
            "data.max_length": 256, "train.per_device_train_batch_size": 4, "train.max_steps": 2,
            "train.learning_rate": 1e-3, "eval.num_prompts": 2, "eval.max_new_tokens": 4,
            "eval.batch_size": 4, "reference.batch_size": 8, "registry.experiment": f"{name}-test",
            "registry.model_name": f"tiny-{name}", "registry.gate.thresholds": {}}


def test_sweep_trains_children_under_one_parent_and_registers_the_best(dpo_home, tmp_path):
    """Three variants (a list: two betas and another loss type) share one reference cache (one
    precompute), give three child runs under one parent and one registered version."""
    from flows.sweep import dpo_sweep

    variants = [{"loss.beta": 0.1}, {"loss.beta": 0.5}, {"loss.beta": 0.1, "loss.loss_type": "ipo"}]
    s = dpo_sweep(overrides=_tiny_overrides(tmp_path, "sweep"), run_name="sw", grid=variants,
                  metric="eval/rewards/margins")

    assert len(s["variants"]) == 3 and s["registered_version"] == 1
    assert s["precomputes"] == 1
    assert len(list((dpo_home / "runs" / "sw").glob("precompute.json"))) == 1
    margins = [v["eval/rewards/margins"] for v in s["variants"]]
    assert s["best"] == margins.index(max(margins))
    assert json.loads((Path(s["run_dir"]) / "summary.json").read_text())["best"] == s["best"]
    _check_children(s, variants, "tiny-sweep")

    # dpo compare shows the sweep as one table: its variants with their overrides, the best marked
    from dpo_engine import tracking as registry

    df = registry.compare_runs("sweep-test", sweep="sw", metrics=["eval/rewards/margins"])
    assert list(df["run_name"]) == ["sw-00", "sw-01", "sw-02"]
    assert list(df["variant"]) == ["loss.beta=0.1", "loss.beta=0.5", "loss.beta=0.1, loss.loss_type=ipo"]
    assert list(df["best"]) == ["*" if i == s["best"] else "" for i in range(3)]
    assert list(df["eval/rewards/margins"]) == pytest.approx(margins)
    assert df["model_versions"].tolist()[s["best"]] == "tiny-sweep/1"
    plain = registry.compare_runs("sweep-test")  # the parent (no training of its own) is left out
    assert sorted(plain["run_name"]) == ["sw-00", "sw-01", "sw-02"] and set(plain["sweep"]) == {"sw"}
    with pytest.raises(ValueError, match="no sweep 'nope' in this experiment \\(sweeps: sw\\)"):
        registry.compare_runs("sweep-test", sweep="nope")


def _check_children(s: dict, variants: list[dict], model_name: str) -> None:
    """One finished child MLflow run per variant under the parent; only the best registered."""
    from mlflow import MlflowClient

    from data_contracts.state import mlflow_uri
    from dpo_engine import tracking as registry

    registry.connect(mlflow_uri())
    client = MlflowClient()
    children = [v["mlflow_run_id"] for v in s["variants"]]
    assert len(set(children)) == len(variants)
    for rid, variant in zip(children, variants):
        run = client.get_run(rid)
        assert run.data.tags["mlflow.parentRunId"] == s["mlflow_parent_run_id"]
        for field, value in variant.items():
            assert run.data.tags[f"dpo.sweep.{field}"] == str(value)
            assert run.data.params[field] == str(value)
        assert run.info.status == "FINISHED"
    parent = client.get_run(s["mlflow_parent_run_id"])
    assert parent.data.tags["dpo.sweep.best_run_id"] == children[s["best"]]
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert [v.run_id for v in versions] == [children[s["best"]]]  # only the best is registered


def test_stop_options_and_board(tmp_path):
    import threading

    from dpo_engine.sweep import Board, LaggingRule, best_at, stop_options

    assert stop_options(None) is None
    assert stop_options(0.05) == {"stop_margin": 0.05, "stop_metric": "eval/rewards/accuracies",
                                  "stop_mode": "max"}
    assert stop_options(0.1, "eval/loss")["stop_mode"] == "min"
    with pytest.raises(ConfigError, match="not measured at checkpoints"):
        stop_options(0.1, "eval/win_rate")
    with pytest.raises(ConfigError, match=">= 0"):
        stop_options(-1)
    with pytest.raises(ConfigError, match="max or min"):
        stop_options(0.1, "eval/loss", "down")

    board = Board(tmp_path / "board.json")
    # parallel posts never lose one another (lock + atomic replace)
    threads = [threading.Thread(target=lambda v=v: [board.post(v, {s: s * 0.1}) for s in range(1, 21)])
               for v in ("00", "01", "02", "03")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert {v: len(steps) for v, steps in board.read().items()} == {"00": 20, "01": 20, "02": 20, "03": 20}
    assert best_at(board.read(), 5, "max")[0] == pytest.approx(0.5) and best_at(board.read(), 99, "max") is None

    loss = Board(tmp_path / "loss.json")
    loss.post("00", {2: 0.40, 4: 0.30})
    rule = LaggingRule(loss, "01", "eval/loss", "min", margin=0.05)
    assert not rule([{"step": 1, "loss": 0.9}])  # not an evaluation step: nothing to compare
    assert not rule([{"step": 2, "eval/loss": 0.44}])  # behind by 0.04 <= 0.05
    assert rule([{"step": 4, "eval/loss": 0.36}]) and "lagging: eval/loss 0.36 vs best 0.3 of variant 00 " \
        "at step 4" in rule.reason
    assert rule([{"step": 5}])  # sticky
    # the decision at a step is recorded: another rank (or a resumed run) decides the same way
    assert LaggingRule(loss, "01", "eval/loss", "min", 0.05)([{"step": 4, "eval/loss": 0.1}])
    assert not LaggingRule(loss, "01", "eval/loss", "min", 0.05)([{"step": 2, "eval/loss": 9.0}])
    assert not LaggingRule(loss, "02", "eval/loss", "min", 0.05)([{"step": 6, "eval/loss": 9.0}])  # first at 6
    assert loss.read()["01"] == {2: 0.44, 4: 0.36}


def test_lagging_variant_is_stopped_early(dpo_home, tmp_path):
    """Sequential sweep: the good variant (first) runs to the end; the useless learning rate is stopped
    at its first evaluation, keeps its checkpoint, is not evaluated, not chosen, not indexed for reuse."""
    from mlflow import MlflowClient

    from data_contracts.state import mlflow_uri
    from dpo_engine import tracking as registry
    from dpo_engine.stages.index import lookup
    from flows.sweep import dpo_sweep

    overrides = {**_tiny_overrides(tmp_path, "stop"), "train.max_steps": 4, "train.eval_steps": 2,
                 "train.save_steps": 1}
    s = dpo_sweep(overrides=overrides, run_name="st", grid={"train.learning_rate": [5e-3, 1e-12]},
                  metric="eval/rewards/margins", stop_margin=0.05, stop_metric="eval/rewards/margins")

    good, bad = s["variants"]
    assert good["status"] == "completed" and good["steps"] == 4 and good["eval/rewards/margins"] is not None
    assert bad["steps"] == 2 and bad["eval/rewards/margins"] is None
    assert bad["status"].startswith("stopped early (lagging: eval/rewards/margins 0 vs best ") and \
        bad["status"].endswith(" of variant 00 at step 2)")
    assert s["best"] == 0 and s["registered_version"] == 1
    board = json.loads(Path(s["board"]).read_text())
    assert sorted(board["values"]["00"]) == ["2", "4"] and list(board["values"]["01"]) == ["2"]
    assert board["decisions"] == {"00": {"2": None, "4": None}, "01": {"2": bad["status"]}}

    bad_dir = Path(bad["run_dir"])
    assert (bad_dir / "train" / "checkpoints" / "step-1" / "state.json").is_file()  # last checkpoint kept
    assert (bad_dir / "train" / "model" / "config.json").is_file()
    trained = json.loads((bad_dir / "train.json").read_text())
    assert trained["stop_reason"] == bad["status"] and trained["stopped_early"]
    assert lookup("train", trained["fingerprint"]) is None  # never reused by a later run
    assert not (bad_dir / "evaluate.json").exists()

    registry.connect(mlflow_uri())
    client = MlflowClient()
    tags = [client.get_run(v["mlflow_run_id"]).data.tags for v in s["variants"]]
    assert tags[0]["dpo.sweep.status"] == "completed" and tags[1]["dpo.sweep.status"] == bad["status"]
    assert all(t["mlflow.parentRunId"] == s["mlflow_parent_run_id"] for t in tags)


def test_parallel_sweep_under_a_concurrency_limit(dpo_home, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.sweep import CONCURRENCY_LIMIT, dpo_sweep

    s = dpo_sweep(overrides=_tiny_overrides(tmp_path, "par"), run_name="par", grid={"loss.beta": [0.1, 0.5]},
                  metric="eval/rewards/margins", parallel=2)

    assert s["parallel"] == 2 and s["precomputes"] == 1
    assert [v["status"] for v in s["variants"]] == ["completed", "completed"]
    assert all(v["steps"] == 2 and v["eval/rewards/margins"] is not None for v in s["variants"])
    assert len(list((dpo_home / "runs" / "par").glob("precompute.json"))) == 1
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(CONCURRENCY_LIMIT)
    assert limit.limit == 2 and limit.active_slots == 0  # every slot released
    _check_children(s, [{"loss.beta": 0.1}, {"loss.beta": 0.5}], "tiny-par")


def test_sweep_user_errors_are_one_line(dpo_home, tmp_path, capsys):
    from flows.cli import main
    from flows.sweep import run_sweep

    for argv, msg in ((["--stop-margin", "0.1"], "needs periodic evaluation: set train.eval_steps"),
                      (["--stop-margin", "0.1", "--set", "train.eval_steps=5", "--stop-metric", "eval/win_rate"],
                       "'eval/win_rate' is not measured at checkpoints"),
                      (["--parallel", "0"], "--parallel must be >= 1")):
        assert main(["sweep", "--grid", "loss.beta=0.1,0.2", *argv]) == 1  # before Prefect starts
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err

    overrides = _tiny_overrides(tmp_path, "err")
    with pytest.raises(ConfigError, match="parallel must be a whole number"):
        run_sweep(None, overrides, "e", {"loss.beta": [0.1]}, "eval/win_rate", parallel=0)
    with pytest.raises(ConfigError, match="set train.eval_steps"):
        run_sweep(None, overrides, "e", {"loss.beta": [0.1]}, "eval/win_rate", stop_margin=0.1)


def test_variant_tasks_never_exceed_the_concurrency_limit(dpo_home, monkeypatch):
    """3 variant tasks submitted at once under a 2-slot limit: at most 2 run at the same time."""
    import threading
    import time

    from prefect import flow

    import flows.sweep as fs

    lock, running, peak = threading.Lock(), [0], [0]

    def fake(index, *args):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        deadline = time.monotonic() + 60  # hold the slot until two run at once (a loaded machine is slow)
        while peak[0] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the third one would start now if the limit let it
        with lock:
            running[0] -= 1
        return index

    monkeypatch.setattr(fs, "train_and_evaluate", fake)

    @flow
    def three():
        fs.ensure_concurrency_limit("dpo-train-test", 2)
        futures = [fs.variant_task.submit(i, None, {}, "", {}, "", {}, None, None, limit="dpo-train-test")
                   for i in range(3)]
        return [f.result() for f in futures]

    assert three() == [0, 1, 2]
    assert peak[0] == 2


def test_a_failed_variant_does_not_discard_the_best_and_threads_are_bounded(dpo_home, monkeypatch):
    from prefect import flow

    import flows.sweep as fs

    seen = fake_sweep(monkeypatch, fail={1}, values={0: 0.5, 1: 0.0, 2: 0.7, 3: 0.6})

    @flow
    def sweep_of_four():
        return fs.run_sweep(None, None, "bounded", {"loss.beta": [0.1, 0.2, 0.3, 0.4]}, "eval/win_rate", parallel=2)

    summary = sweep_of_four()
    assert len(seen["threads"]) <= 2  # the thread pool is bounded by `parallel`
    assert seen["registered"] == ["run2"] and summary["best"] == 2
    assert summary["failed"] == 1 and summary["variants"][1]["status"] == "failed"
    assert "variant 1 broke" in summary["variants"][1]["error"]
    assert json.loads((Path(summary["run_dir"]) / "summary.json").read_text())["variants"][1]["status"] == "failed"


def test_a_sweep_whose_every_variant_failed_fails(dpo_home, monkeypatch):
    from prefect import flow

    import flows.sweep as fs

    fake_sweep(monkeypatch, fail={0, 1}, values={0: 0.5, 1: 0.4})

    @flow
    def sweep_of_two():
        return fs.run_sweep(None, None, "allfail", {"loss.beta": [0.1, 0.2]}, "eval/win_rate", parallel=1)

    with pytest.raises(RuntimeError, match="variant 0 broke"):
        sweep_of_two()
