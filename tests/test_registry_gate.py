"""Promotion gate against the current champion, version tags, plots and tables (no training)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from tiny import tiny_model_dir

pytest.importorskip("mlflow")

from dpo_engine.evaluation import plots

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from dpo_engine import tracking as registry  # noqa: E402
from dpo_engine.stages.runtime import code_version# noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def store(dpo_home):
    registry.connect(f"sqlite:///{dpo_home}/mlflow/mlflow.db")
    return dpo_home


def _run(name: str, metrics: dict) -> str:
    rid = registry.start_run("gate-test", name)
    registry.log_metrics(rid, metrics, step=1)
    return rid


def _register(rid, model_dir, metrics, **gate):
    return registry.register_model(rid, model_dir, "tiny-gate", metrics=metrics, gate_thresholds={},
                                   tags={"code_version": "abc123"}, **gate)


def test_champion_must_be_beaten_by_min_improvement(store, tmp_path):
    model_dir = tiny_model_dir(tmp_path / "m", hidden=16)
    gate = {"beat_champion_metric": "eval/win_rate", "min_improvement": 0.05}
    client = MlflowClient()

    r1 = _run("r1", {"eval/win_rate": 0.6})
    v1 = _register(r1, model_dir, {"eval/win_rate": 0.6, "eval/rewards/accuracies": 0.7}, **gate)
    assert v1["gate_passed"] and v1["aliases"] == ["challenger", "champion"]  # no champion yet
    tags = client.get_model_version("tiny-gate", "1").tags
    assert tags["code_version"] == "abc123" and tags["gate_passed"] == "true"
    assert tags["model_format"] == "full"  # not a PEFT adapter (tests/test_registry_adapter.py)
    assert float(tags["metric.eval/win_rate"]) == 0.6
    assert float(tags["metric.eval/rewards/accuracies"]) == 0.7

    # not enough better: challenger only, champion stays 1, the reason names both values
    r2 = _run("r2", {"eval/win_rate": 0.63})
    v2 = _register(r2, model_dir, {"eval/win_rate": 0.63}, **gate)
    assert v2["version"] == 2 and v2["aliases"] == ["challenger"] and not v2["gate_passed"]
    assert v2["champion_version"] == 1
    assert "does not beat champion version 1 (0.6) by >= 0.05" in v2["gate_reasons"][0]
    assert client.get_model_version("tiny-gate", "2").tags["gate_reasons"] == v2["gate_reasons"][0]

    # registering the same run again creates no second version and changes nothing
    again = _register(r2, model_dir, {"eval/win_rate": 0.63}, **gate)
    assert again["version"] == 2 and len(client.search_model_versions("name = 'tiny-gate'")) == 2

    # a missing metric fails; a clear improvement wins
    r3 = _run("r3", {})
    assert "missing" in _register(r3, model_dir, {}, **gate)["gate_reasons"][0]
    r4 = _run("r4", {"eval/win_rate": 0.7})
    v4 = _register(r4, model_dir, {"eval/win_rate": 0.7}, **gate)
    assert v4["gate_passed"] and "champion" in v4["aliases"] and v4["champion_version"] == 4

    # the current champion registered again is not compared with itself
    assert _register(r4, model_dir, {"eval/win_rate": 0.7}, **gate)["gate_passed"]


def test_champion_metric_falls_back_to_run_metrics(store, tmp_path):
    model_dir = tiny_model_dir(tmp_path / "m", hidden=16)
    r1 = _run("r1", {"eval/kl_custom": 0.4})  # not a tagged metric: read from the run
    _register(r1, model_dir, {})
    champ = registry.champion("tiny-gate")
    assert registry.version_metric(champ, "eval/kl_custom") == pytest.approx(0.4)
    assert registry.version_metric(champ, "nope") is None
    r2 = _run("r2", {})
    out = _register(r2, model_dir, {"eval/kl_custom": 0.3}, beat_champion_metric="eval/kl_custom")
    assert not out["gate_passed"] and "0.3 does not beat champion version 1 (0.4)" in out["gate_reasons"][0]
    assert registry.champion("no-such-model") is None


def test_pyfunc_predicts_through_champion_alias(store, tmp_path):
    import mlflow

    r1 = _run("r1", {})
    _register(r1, tiny_model_dir(tmp_path / "m", hidden=16), {})
    model = mlflow.pyfunc.load_model("models:/tiny-gate@champion")
    out = model.predict(["Hi"], params={"max_new_tokens": 3})
    assert len(out) == 1 and isinstance(out[0], str)


def test_config_hash_covers_what_decides_the_model_and_its_evaluation():
    """The nightly skip compares config_hash with the champion's: a change of the model's training
    or evaluation (peft, reference, eval included) is something new; where it is registered or
    logged, the run's name and excluded fields (data.num_proc) are not."""
    from data_contracts.config import RunConfig, load_config
    from dpo_engine.stages.register import CONFIG_HASH_SECTIONS, config_hash

    assert set(RunConfig.model_fields) - set(CONFIG_HASH_SECTIONS) == {"run_name", "registry", "tracking"}
    base = config_hash(load_config())
    for changed in ({"peft.enabled": True}, {"peft.r": 8}, {"peft.export": "adapter"},
                    {"reference.source": "model"}, {"reference.batch_size": 4},
                    {"eval.max_new_tokens": 7}, {"eval.judge": None}, {"data.max_length": 512},
                    {"model.dtype": "float32"}, {"loss.beta": 0.2}, {"train.learning_rate": 1e-5}):
        assert config_hash(load_config(overrides=changed)) != base, changed
    for same in ({"registry.model_name": "other"}, {"registry.gate.thresholds": {"eval/win_rate": 0.9}},
                 {"registry.skip_unchanged": True}, {"run_name": "nightly-x"},
                 {"tracking.mlflow_tracking_uri": "sqlite:////tmp/x.db"}, {"data.num_proc": 4}):
        assert config_hash(load_config(overrides=same)) == base, same


def test_code_version_reads_git_without_git(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    git = tmp_path / "repo" / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text(sha + "\n")
    assert code_version(tmp_path / "repo") == sha
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text(f"# pack-refs\n{sha} refs/heads/main\n")
    assert code_version(tmp_path / "repo") == sha
    (git / "HEAD").write_text(sha)  # detached
    assert code_version(tmp_path / "repo") == sha
    assert code_version(tmp_path / "elsewhere") is None


def test_plots_are_pngs(tmp_path):
    history = [{"step": s, "loss": 0.7 - s / 10, "rewards/margins": s / 10,
                "rewards/accuracies": 0.5 + s / 10} for s in (1, 2, 3)]
    curves = plots.training_curves(history, tmp_path / "t.png")
    assert curves.read_bytes().startswith(PNG)
    assert plots.training_curves([], tmp_path / "none.png") is None

    table = pd.DataFrame({"policy_score": [1.0, 0.5], "reference_score": [0.0, 0.5], "win": [1.0, 0.5]})
    scores = plots.eval_scores(table, {"eval/win_rate": 0.75, "eval/win_rate_ci_low": 0.5,
                                       "eval/win_rate_ci_high": 1.0}, tmp_path / "e.png")
    assert scores.read_bytes().startswith(PNG)
    assert plots.eval_scores(pd.DataFrame({"prompt": ["x"]}), {}, tmp_path / "no.png") is None

    both = plots.compare_runs({"a": {"rewards/margins": [(1, 0.1), (2, 0.2)]}, "b": {}},
                              {"a": (0.6, 0.4, 0.8), "b": None}, tmp_path / "sub" / "c.png")
    assert both.read_bytes().startswith(PNG)


def test_log_table_and_metric_histories(store):
    rid = _run("r", {"rewards/margins": 0.1})
    registry.log_metrics(rid, {"rewards/margins": 0.3}, step=2)
    assert registry.metric_histories(rid, ["rewards/margins", "absent"]) == \
        {"rewards/margins": [(1, 0.1), (2, 0.3)]}
    assert registry.win_rate(rid) is None
    registry.log_metrics(rid, {"eval/win_rate": 0.5, "eval/win_rate_ci_low": 0.2,
                               "eval/win_rate_ci_high": 0.8})
    assert registry.win_rate(rid) == (0.5, 0.2, 0.8)
    registry.log_table(rid, pd.DataFrame({"prompt": ["p"], "policy_score": [1.0]}),
                       "evaluation/samples_table.json")
    local = mlflow.artifacts.download_artifacts(run_id=rid,
                                                artifact_path="evaluation/samples_table.json")
    assert json.loads(open(local).read())["columns"] == ["prompt", "policy_score"]
    # logged again (an evaluate re-run after a crash): replaced, not appended (MLflow appends)
    registry.log_table(rid, pd.DataFrame({"prompt": ["p", "q"], "policy_score": [1.0, 0.0]}),
                       "evaluation/samples_table.json")
    local = mlflow.artifacts.download_artifacts(run_id=rid,
                                                artifact_path="evaluation/samples_table.json")
    assert json.loads(open(local).read())["data"] == [["p", 1.0], ["q", 0.0]]
    tags = MlflowClient().get_run(rid).data.tags
    assert json.loads(tags["mlflow.loggedArtifacts"]) == [{"path": "evaluation/samples_table.json",
                                                          "type": "table"}]


def test_concurrent_registrations_end_with_the_better_one_champion(store, tmp_path):
    """Two registrations that both passed the gate check before either set an alias (the 0.7 one
    creates its version first, the 0.6 one is the newest): the 0.7 version is champion, and each
    result states the aliases it ended with."""
    import threading

    model_dir = tiny_model_dir(tmp_path / "m", hidden=16)
    gate = {"beat_champion_metric": "eval/win_rate"}
    runs = {"a": _run("a", {"eval/win_rate": 0.7}), "b": _run("b", {"eval/win_rate": 0.6})}
    logged = threading.Barrier(2, timeout=30)  # both are past the gate check
    a_created, b_created, a_aliased = threading.Event(), threading.Event(), threading.Event()
    order = {  # (name, point): (event to set, event to wait for)
        ("a", "version-created"): (a_created, b_created), ("a", "aliases-set"): (a_aliased, None),
        ("b", "model-logged"): (None, a_created), ("b", "version-created"): (b_created, a_aliased)}

    def steps(name):
        def on_step(point):
            if point == "model-logged":
                logged.wait()
            done, wait_for = order.get((name, point), (None, None))
            if done is not None:
                done.set()
            if wait_for is not None:
                wait_for.wait(10)  # the old code never reached some points: go on after a while
        return on_step

    out = {}

    def register(name, value):
        out[name] = registry.register_model(runs[name], model_dir, "tiny-race", metrics={"eval/win_rate": value},
                                            gate_thresholds={}, on_step=steps(name), **gate)

    threads = [threading.Thread(target=register, args=a) for a in (("a", 0.7), ("b", 0.6))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    a, b = out["a"], out["b"]
    assert (a["version"], b["version"]) == (1, 2)
    assert int(registry.champion("tiny-race").version) == 1
    client = MlflowClient()
    for res in (a, b):  # each summary is what the store says
        assert res["aliases"] == sorted(client.get_model_version("tiny-race", str(res["version"])).aliases)
    assert a["aliases"] == ["champion"] and a["gate_passed"]
    assert b["aliases"] == ["challenger"] and not b["gate_passed"] and b["champion_version"] == 1
    assert client.get_model_version("tiny-race", "2").tags["gate_passed"] == "false"


def test_load_registered_reads_weights_only_while_pyfunc_runs_the_registry_s_code(store, tmp_path):
    """A registry writer who plants code in a version's artifact (an MLmodel loader_module) gets it
    run by mlflow.pyfunc.load_model, never by load_registered, which reads config and safetensors."""
    import mlflow
    import yaml

    marker = tmp_path / "planted-code-ran"
    r1 = _run("r1", {})
    _register(r1, tiny_model_dir(tmp_path / "m", hidden=16), {})
    mlmodels = sorted((store / "mlflow").rglob("MLmodel"), key=lambda p: p.stat().st_mtime)
    stored = mlmodels[-1].parent
    (stored / "code").mkdir(exist_ok=True)
    (stored / "code" / "planted.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "def _load_pyfunc(path, model_config=None):\n    raise RuntimeError('planted')\n")
    meta = yaml.safe_load((stored / "MLmodel").read_text())
    meta["flavors"]["python_function"].update({"loader_module": "planted", "code": "code"})
    (stored / "MLmodel").write_text(yaml.safe_dump(meta))

    model, tok = registry.load_registered("models:/tiny-gate@champion")
    assert model.config.model_type == "llama" and tok("hi")["input_ids"] and not marker.exists()
    with pytest.raises(Exception, match="planted"):
        mlflow.pyfunc.load_model("models:/tiny-gate@champion")
    assert marker.exists()  # what the README warns about
