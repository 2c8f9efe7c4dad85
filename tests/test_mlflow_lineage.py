"""What the MLflow UI shows of a run's lineage (issue 17): its dataset inputs, its config.yaml, the git
commit it trained from, system metrics while training, the final evaluation at the last training
step, and the logged model carrying those metrics. One tiny run (the stages called in process, no
Prefect) on a model built here, shared by the module."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tiny import tiny_model_dir

STEPS = 3
SHA_TRAIN = "1" * 40  # the commit the fake checkout is at while training
SHA_LATER = "2" * 40  # ... and when the model is registered


def _fake_checkout(root: Path, sha: str) -> Path:
    """A git checkout as code_version reads it (HEAD -> refs/heads/main -> sha), without git."""
    (root / ".git" / "refs" / "heads").mkdir(parents=True, exist_ok=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / ".git" / "refs" / "heads" / "main").write_text(sha + "\n")
    return root


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    from mlflow import MlflowClient

    from data_contracts.config import load_config
    from data_contracts.state import mlflow_uri
    from dpo_engine import tracking
    from dpo_engine.pipeline import new_run_dir
    from dpo_engine.stages import evaluate, precompute, register, runtime, train, validate

    tmp = tmp_path_factory.mktemp("lineage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_HOME", str(tmp / "home"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        checkout = _fake_checkout(tmp / "checkout", SHA_TRAIN)
        mp.setattr(runtime, "project_root", lambda: checkout)  # whatever this test tree is
        model_dir = tiny_model_dir(tmp / "tiny-model")
        cfg = load_config(overrides={
            "run_name": "lineage", "model.name_or_path": str(model_dir), "data.train_limit": 6,
            "data.eval_limit": 2, "data.max_length": 256, "train.per_device_train_batch_size": 2,
            "train.max_steps": STEPS, "train.learning_rate": 1e-3, "train.logging_steps": 2,
            "train.eval_steps": 2, "train.save_steps": 10, "eval.num_prompts": 1, "eval.max_new_tokens": 2,
            "eval.batch_size": 4, "reference.batch_size": 8, "registry.experiment": "lineage",
            "registry.model_name": "tiny-lineage", "registry.gate.thresholds": {},
            "tracking.system_metrics_interval_s": 0.5})
        run_dir = new_run_dir(cfg)
        validated = validate.run(cfg, run_dir)
        precomputed = precompute.run(cfg, run_dir, validated)
        trained = train.run(cfg, run_dir, validated, precomputed)
        run_id = trained["mlflow_run_id"]
        tracking.connect(mlflow_uri(cfg))
        tracking.Outbox(run_id).send(wait=True)  # what training's background sender has not sent yet
        client = MlflowClient()
        before_register = client.get_run(run_id)
        evaluated = evaluate.run(cfg, run_dir, validated, precomputed, trained)
        _fake_checkout(checkout, SHA_LATER)
        registered = register.run(cfg, run_dir, validated, trained, evaluated)
        yield {"cfg": cfg, "run_dir": run_dir, "validated": validated, "trained": trained,
               "evaluated": evaluated, "registered": registered, "run_id": run_id,
               "before_register": before_register, "client": client, "tmp": tmp}


def _logged_model(lineage):
    """The LoggedModel the run's registered version was created from."""
    client = lineage["client"]
    mv = client.get_model_version("tiny-lineage", str(lineage["registered"]["version"]))
    return client.get_logged_model(mv.source.removeprefix("models:/"))  # source: models:/<model_id>


def test_the_train_and_eval_splits_are_the_run_s_dataset_inputs(lineage):
    v = lineage["validated"]
    inputs = lineage["before_register"].inputs.dataset_inputs  # logged when the run starts
    got = {({t.key: t.value for t in i.tags}["mlflow.data.context"]): i.dataset for i in inputs}
    assert sorted(got) == ["evaluation", "training"] and len(inputs) == 2
    for context, split, name in (("training", "train", "builtin:answer-format"),
                                 ("evaluation", "eval", "builtin:answer-format@eval")):
        ds = got[context]
        assert ds.name == name == v["sources"][split]
        assert ds.digest == v[split]["fingerprint"][:32]
        assert ds.source_type == "builtin" and json.loads(ds.source) == {"uri": name}
        assert json.loads(ds.profile)["num_rows"] == v[split]["rows"]
        cols = {c["name"]: c for c in json.loads(ds.schema)["mlflow_colspec"]}
        assert cols["prompt"]["type"] == "string"
        assert cols["chosen_input_ids"]["type"] == "array" and cols["chosen_input_ids"]["items"]["type"] == "integer"
    tags = {t.key: t.value for t in inputs[0].tags}
    assert tags["dpo.fingerprint"] in (v["train"]["fingerprint"], v["eval"]["fingerprint"])
    # registration (which sends the outbox again) added none
    assert len(lineage["client"].get_run(lineage["run_id"]).inputs.dataset_inputs) == 2


def test_split_inputs_name_a_held_out_split_and_describe_sources():
    from dpo_engine.tracking.datasets import source_description, split_inputs

    split = {"fingerprint": "f" * 64, "rows": 3, "rows_in": 5, "rejected": 2}
    got = split_inputs({"train": split, "eval": {**split, "fingerprint": "e" * 64},
                        "sources": {"train": "/data/pairs.jsonl", "eval": None}})
    assert [(d["name"], d["context"], d["digest"]) for d in got] == [
        ("/data/pairs.jsonl", "training", "f" * 32), ("/data/pairs.jsonl#eval", "evaluation", "e" * 32)]
    assert got[1]["source"] == json.dumps({"uri": "/data/pairs.jsonl"}) and got[1]["schema"] is None
    assert json.loads(got[0]["profile"]) == {"num_rows": 3, "rows_in": 5, "rejected": 2}
    assert source_description("https://u:secret@host/x.parquet") == ("http", json.dumps({"url": "https://***@host/x.parquet"}))
    assert source_description("s3://bucket/x.parquet")[0] == "s3"
    assert source_description("org/prefs") == ("hugging_face", json.dumps({"path": "org/prefs"}))


def test_the_run_folder_s_config_yaml_is_an_artifact(lineage, tmp_path):
    import mlflow

    got = mlflow.artifacts.download_artifacts(run_id=lineage["run_id"], artifact_path="config.yaml",
                                              dst_path=str(tmp_path))
    assert Path(got).read_bytes() == (lineage["run_dir"] / "config.yaml").read_bytes()


def test_the_git_commit_is_set_when_the_run_starts_and_kept_at_registration(lineage):
    assert lineage["before_register"].data.tags["mlflow.source.git.commit"] == SHA_TRAIN
    # registered from a later commit: the run keeps the one it trained from, the version says where
    # it was registered from
    assert lineage["client"].get_run(lineage["run_id"]).data.tags["mlflow.source.git.commit"] == SHA_TRAIN
    mv = lineage["client"].get_model_version("tiny-lineage", str(lineage["registered"]["version"]))
    assert mv.tags["code_version"] == SHA_LATER


def test_system_metrics_are_logged_while_training(lineage):
    pytest.importorskip("psutil")
    metrics = lineage["before_register"].data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    assert metrics["system/system_memory_usage_megabytes"] > 0
    steps = [m.step for m in lineage["client"].get_metric_history(lineage["run_id"],
                                                                   "system/cpu_utilization_percentage")]
    assert steps == list(range(len(steps)))  # one step per sample, none sent twice


def test_system_metrics_are_off_cleanly_without_psutil_or_when_switched_off(tmp_path, monkeypatch):
    from dpo_engine.tracking import Outbox
    from dpo_engine.tracking.system_metrics import system_metrics

    box, said = Outbox("not-a-run", folder=tmp_path), []
    with system_metrics(box, 0, log=said.append) as monitor:
        assert monitor is None
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    with system_metrics(box, 0.1, log=said.append) as monitor:
        assert monitor is None
    assert said == ["system metrics: not logged (psutil is not installed)"]
    assert box.pending() == []


def test_final_evaluation_metrics_are_at_the_last_training_step(lineage):
    client, run_id = lineage["client"], lineage["run_id"]
    last = lineage["trained"]["steps"]
    assert last == STEPS
    final = lineage["evaluated"]["metrics"]
    for name in ("eval/rewards/accuracies", "eval/loss", "eval/win_rate", "eval/kl_policy_reference"):
        history = client.get_metric_history(run_id, name)
        assert max(m.step for m in history) == last, name
        at_last = [m for m in history if m.step == last]
        assert len(at_last) == 1 and at_last[0].value == pytest.approx(final[name]), name
    # the periodic evaluation's point at step 2 stays below it
    assert sorted(m.step for m in client.get_metric_history(run_id, "eval/rewards/margins")) == [2, last]


def test_the_logged_model_carries_the_evaluation_metrics(lineage):
    client, run_id = lineage["client"], lineage["run_id"]
    model = _logged_model(lineage)
    assert model.source_run_id == run_id
    by_name = {m.key: m for m in model.metrics}
    final, v = lineage["evaluated"]["metrics"], lineage["validated"]
    for name in ("eval/rewards/accuracies", "eval/win_rate", "eval/kl_policy_reference"):
        m = by_name[name]
        assert m.value == pytest.approx(final[name]) and m.step == STEPS
        assert (m.dataset_name, m.dataset_digest) == (v["sources"]["eval"], v["eval"]["fingerprint"][:32])
    assert by_name["loss"].step == STEPS and by_name["loss"].dataset_name == v["sources"]["train"]
    found = client.search_logged_models([model.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert [m.model_id for m in found] == [model.model_id]
    assert {m.key for m in found[0].metrics} >= set(final)
    # linking logged no second point in the run's own history
    assert len([m for m in client.get_metric_history(run_id, "eval/win_rate") if m.step == STEPS]) == 1


def test_registering_again_logs_nothing_twice(lineage):
    from dpo_engine.stages import register

    client, run_id = lineage["client"], lineage["run_id"]
    model = _logged_model(lineage)
    histories = {k: len(client.get_metric_history(run_id, k)) for k in lineage["evaluated"]["metrics"]}
    again = register.run(lineage["cfg"], lineage["run_dir"], lineage["validated"], lineage["trained"],
                         lineage["evaluated"])
    assert again["version"] == lineage["registered"]["version"]
    assert len(client.search_model_versions("name = 'tiny-lineage'")) == 1
    found = client.search_logged_models([model.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert [m.model_id for m in found] == [model.model_id]
    assert len(client.get_logged_model(model.model_id).metrics) == len(model.metrics)
    assert {k: len(client.get_metric_history(run_id, k)) for k in histories} == histories
    assert len(client.get_run(run_id).inputs.dataset_inputs) == 2


def test_dataset_inputs_wait_in_the_outbox_while_the_store_is_down(lineage, monkeypatch):
    from mlflow.exceptions import MlflowException

    from dpo_engine import tracking
    from dpo_engine.tracking import client as tracking_client
    from dpo_engine.tracking.datasets import split_inputs

    run_id = tracking.start_run("lineage-outbox", "r")
    box = tracking.Outbox(run_id, folder=lineage["tmp"] / "outbox")
    real = tracking_client.mlflow_client

    class Down:
        def __getattr__(self, name):
            def fail(*a, **k):
                raise MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/log-inputs "
                                      "failed with exception Connection refused")
            return fail

    monkeypatch.setattr(tracking_client, "mlflow_client", lambda: Down())
    assert box.log_inputs(split_inputs(lineage["validated"])) is False
    assert len(box.pending()) == 1
    monkeypatch.setattr(tracking_client, "mlflow_client", real)
    assert box.send(wait=True) and box.pending() == []
    box.log_inputs(split_inputs(lineage["validated"]))  # sent twice (a crash before the entry left)
    assert box.send(wait=True) and box.pending() == []
    inputs = real().get_run(run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == ["builtin:answer-format", "builtin:answer-format@eval"]
