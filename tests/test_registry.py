"""Registry tests: a tmp sqlite store, a tiny Llama built here (never downloads, never /work/shared)."""

from __future__ import annotations

import os
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("mlflow")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from mlflow import MlflowClient  # noqa: E402

from dpo_engine import tracking as registry  # noqa: E402
from dpo_engine.tracking import registration as tracking_registration  # noqa: E402

WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + ("user assistant : the a cat dog sat on mat is "
                                              "good bad yes no hello").split()
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant : {% endif %}")


def _tiny_model_dir(path, seed: int = 0):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    registry.connect(f"sqlite:///{tmp_path}/db/mlflow.db")
    return tmp_path


def _run(name, params, metrics):
    rid = registry.start_run("dpo-test", name, tags={"stage": "train"})
    registry.log_params(rid, params)
    registry.log_metrics(rid, metrics, step=1)
    return rid


def test_register_gate_idempotent_load_and_compare(store):
    model_dir = _tiny_model_dir(store / "policy")
    assert (model_dir / "chat_template.jinja").is_file()
    gate = {"eval/win_rate": 0.5}

    # run 1: passes the gate -> version 1, challenger + champion
    r1 = _run("run-1", {"loss": {"beta": 0.1, "loss_type": "sigmoid"},
                        "train": {"learning_rate": 1e-6}},
              {"rewards/margins": 0.3, "rewards/accuracies": 0.8, "eval/win_rate": 0.7})
    out1 = registry.register_model(r1, model_dir, "tiny", metrics={"eval/win_rate": 0.7},
                                   gate_thresholds=gate, tags={"config_hash": "abc"})
    assert out1["version"] == 1 and out1["model_uri"] == "models:/tiny/1"
    assert out1["aliases"] == ["challenger", "champion"] and out1["gate_passed"]
    assert out1["gate_reasons"] == [] and out1["run_id"] == r1

    # same run again -> still one version, nothing logged again
    again = registry.register_model(r1, model_dir, "tiny", metrics={"eval/win_rate": 0.7},
                                    gate_thresholds=gate)
    assert again["version"] == 1
    client = MlflowClient()
    assert len(client.search_model_versions("name = 'tiny'")) == 1
    assert client.get_model_version("tiny", "1").tags["config_hash"] == "abc"

    # run 2: fails the gate (low value and a missing metric) -> challenger only
    r2 = _run("run-2", {"loss": {"beta": 0.5, "loss_type": "ipo"}, "train": {"learning_rate": 5e-7}},
              {"rewards/margins": -0.1, "eval/win_rate": 0.2})
    out2 = registry.register_model(r2, model_dir, "tiny", metrics={"eval/win_rate": 0.2},
                                   gate_thresholds={**gate, "eval/rewards/accuracies": 0.6})
    assert out2["version"] == 2 and out2["aliases"] == ["challenger"]
    assert not out2["gate_passed"] and len(out2["gate_reasons"]) == 2
    assert any("eval/win_rate" in r and "0.2" in r for r in out2["gate_reasons"])
    assert any("missing" in r for r in out2["gate_reasons"])
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"
    registry.end_run(r1)
    registry.end_run(r2)

    # champion loads with transformers and generates
    model, tokenizer = registry.load_registered("models:/tiny@champion")
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 3
    assert tokenizer.chat_template == CHAT_TEMPLATE

    # the registered model is also a pyfunc
    import mlflow
    pyfunc = mlflow.pyfunc.load_model("models:/tiny/1")
    text = pyfunc.predict(["the cat"], params={"max_new_tokens": 2})
    assert isinstance(text[0], str)

    # compare: newest first, params/metrics/versions
    df = registry.compare_runs("dpo-test")
    assert list(df["run_name"]) == ["run-2", "run-1"]
    assert list(df["loss.beta"]) == ["0.5", "0.1"]
    assert list(df["loss.loss_type"]) == ["ipo", "sigmoid"]
    assert df["rewards/margins"].tolist() == [-0.1, 0.3]
    assert df["model_versions"].tolist() == ["tiny/2", "tiny/1"]
    assert "tiny@champion" in df["aliases"].iloc[1]
    assert (df["status"] == "FINISHED").all()

    # all MLflow state stays in the store / DPO_HOME, none in the cwd
    assert not (store / "mlruns").exists()
    assert any((store / "home" / "mlflow" / "artifacts" / "dpo-test").rglob("model.safetensors"))


def test_log_params_rerun_and_run_reopen(store):
    rid = registry.start_run("dpo-test", "r", tags={"a": 1})
    registry.log_params(rid, {"train": {"seed": 1}, "long": "x" * 10_000})
    registry.log_params(rid, {"train": {"seed": 1}, "long": "x" * 10_000})  # re-run: no error
    with pytest.raises(ValueError, match="train.seed"):
        registry.log_params(rid, {"train": {"seed": 2}})
    registry.set_tags(rid, {"stage": "eval"})
    registry.log_dict(rid, {"k": 1}, "summary.json")
    registry.end_run(rid)
    assert registry.start_run("dpo-test", "ignored", run_id=rid) == rid
    run = MlflowClient().get_run(rid)
    assert run.info.status == "RUNNING" and run.data.tags["stage"] == "eval"
    assert len(run.data.params["long"]) == 6000
    assert [a.path for a in MlflowClient().list_artifacts(rid)] == ["summary.json"]


def test_unreachable_server_fails_fast():
    t0 = time.monotonic()
    with pytest.raises(registry.TrackingUnavailable, match="cannot reach MLflow tracking server "
                       "at http://127.0.0.1:9"):
        registry.connect("http://127.0.0.1:9")
    assert time.monotonic() - t0 < 5


def test_sqlite_folder_not_creatable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(registry.TrackingUnavailable, match="tracking.mlflow_tracking_uri"):
        registry.connect(f"sqlite:///{blocker}/sub/mlflow.db")


def test_two_registrations_of_one_run_leave_one_version(store, monkeypatch):
    """Concurrent registrations of one run: threads in one state home are serialised by its lock;
    a registration that races past the lock (another machine: simulated by an existence check that
    misses the other's version) deletes its own duplicate and reports the first version."""
    import threading

    model_dir = _tiny_model_dir(store / "policy")
    rid = _run("run-1", {"loss": {"beta": 0.1}}, {"eval/win_rate": 0.7})
    kw = dict(metrics={"eval/win_rate": 0.7}, gate_thresholds={})
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(registry.register_model(rid, model_dir, "tiny", **kw)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [o["version"] for o in outs] == [1, 1]

    real, calls = tracking_registration.version_of_run, []

    def first_check_misses(*a):  # as if version 1 were created just after this check
        calls.append(a)
        return None if len(calls) == 1 else real(*a)

    monkeypatch.setattr(tracking_registration, "version_of_run", first_check_misses)
    out = registry.register_model(rid, model_dir, "tiny", **kw)
    assert out["version"] == 1 and len(calls) == 2  # version 2 was created, then deleted
    versions = MlflowClient().search_model_versions("name = 'tiny'")
    assert sorted(int(v.version) for v in versions) == [1]
