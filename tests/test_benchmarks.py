"""Benchmarks as a gate (issue 18): lm-evaluation-harness tasks on the policy and on the reference
(eval.benchmarks), logged as bench/, bench_ref/ and bench_delta/, and registry.gate.max_drop (the policy
may lose at most so much against the reference). Offline, on the small multiple-choice task shipped in
tests/data/lm_eval_tasks/ (sums of two digits, three candidate answers, a local JSONL) and tiny random
models built here."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tiny import tiny_model_dir, tiny_tokenizer

pytest.importorskip("lm_eval")

from data_contracts.config import ConfigError, load_config  # noqa: E402
from data_contracts.config.benchmarks import BenchmarksConfig  # noqa: E402
from dpo_engine.evaluation import benchmarks  # noqa: E402
from dpo_engine.tracking.registration import _gate  # noqa: E402

TASKS = Path(__file__).resolve().parent / "data" / "lm_eval_tasks"
LIMIT = 6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("bench-models")
    def load(seed):
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp / f"m{seed}", seed=seed)).eval()
    return load(0), load(1), tiny_tokenizer()


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


def _accuracy(model, tok, n: int) -> float:
    """The task's accuracy computed here without lm-eval: the choice (after a space) with the highest
    log-likelihood after "Question: ...\\nAnswer:", on the first ``n`` documents."""
    docs = [json.loads(line) for line in (TASKS / "tiny_arith.jsonl").read_text().splitlines()][:n]
    right = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
        scores = []
        for choice in doc["choices"]:
            ids = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            scores.append(sum(float(logp[i - 1, ids[i]]) for i in range(n_ctx, len(ids))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return right / len(docs)


def test_policy_and_reference_are_measured_from_any_working_directory(models, datasets_cache, tmp_path,
                                                                     monkeypatch):
    policy, reference, tok = models
    monkeypatch.chdir(tmp_path)  # the task's JSONL is found next to its YAML, not in the working directory
    cfg = BenchmarksConfig(tasks=[str(TASKS / "tiny_arith.yaml")], limit=LIMIT, batch_size=4)
    loaded = []
    metrics = benchmarks.run_benchmarks(cfg, policy, lambda: loaded.append(1) or reference, tok)
    assert loaded == [1]  # the reference is loaded once, after the policy's run
    for m in ("acc", "acc_norm"):
        for prefix in ("bench", "bench_ref", "bench_delta"):
            assert f"{prefix}/tiny_arith/{m}" in metrics
        assert metrics[f"bench_delta/tiny_arith/{m}"] == pytest.approx(
            metrics[f"bench/tiny_arith/{m}"] - metrics[f"bench_ref/tiny_arith/{m}"])
        assert f"bench/tiny_arith/{m}_stderr" in metrics and f"bench_delta/tiny_arith/{m}_stderr" not in metrics
    # lm-eval's numbers are the models' own: the argmax of the choices' log-likelihoods
    assert metrics["bench/tiny_arith/acc"] == pytest.approx(_accuracy(policy, tok, LIMIT))
    assert metrics["bench_ref/tiny_arith/acc"] == pytest.approx(_accuracy(reference, tok, LIMIT))
    assert metrics["bench/tiny_arith/acc"] != metrics["bench_ref/tiny_arith/acc"]  # two different models
    assert any(datasets_cache.rglob("*.arrow"))  # the dataset cache is where HF_DATASETS_CACHE says

    # a folder runs every task defined in it; the same model as both gives a delta of 0 exactly
    same = benchmarks.run_benchmarks(BenchmarksConfig(tasks=[str(TASKS)], limit=LIMIT, bootstrap_iters=0),
                                     policy, lambda: policy, tok)
    assert same["bench/tiny_arith/acc"] == metrics["bench/tiny_arith/acc"]
    assert {k: v for k, v in same.items() if k.startswith("bench_delta/")} == \
        {"bench_delta/tiny_arith/acc": 0.0, "bench_delta/tiny_arith/acc_norm": 0.0}
    assert not any(k.endswith("_stderr") for k in same)  # bootstrap_iters 0: no standard errors


def test_no_tasks_is_no_step_and_needs_no_lm_eval(models, monkeypatch):
    policy, _, tok = models
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    assert benchmarks.run_benchmarks(BenchmarksConfig(), policy, lambda: pytest.fail("loaded"), tok) == {}
    benchmarks.check_benchmarks(BenchmarksConfig())


def test_lm_eval_missing_is_a_one_line_config_error_with_the_pip_command(models, monkeypatch):
    policy, _, tok = models
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    cfg = BenchmarksConfig(tasks=[str(TASKS / "tiny_arith.yaml")])
    for call in (lambda: benchmarks.check_benchmarks(cfg),
                 lambda: benchmarks.run_benchmarks(cfg, policy, lambda: policy, tok)):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("config error: eval.benchmarks.tasks:")
        assert "lm-eval package" in msg and "pip install 'lm-eval>=0.4.9,<0.5'" in msg


def test_a_task_whose_dataset_is_not_local_fails_in_one_line_naming_it(tmp_path, datasets_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yaml_file = tmp_path / "hub_task.yaml"
    yaml_file.write_text((TASKS / "tiny_arith.yaml").read_text()
                         .replace("task: tiny_arith", "task: hub_only")
                         .replace("dataset_path: json", "dataset_path: dpo-tests/not-downloaded"))
    with pytest.raises(benchmarks.BenchmarkError) as e:
        benchmarks.load_tasks(BenchmarksConfig(tasks=[str(yaml_file)]))
    msg = str(e.value)
    assert "\n" not in msg and "task 'hub_only'" in msg and "'dpo-tests/not-downloaded'" in msg
    assert "not available offline" in msg and "use a local task YAML" in msg
    # a task named from an include_path folder: lm-eval's own tasks are not indexed (a minute) for it
    tm, tasks = benchmarks.load_tasks(BenchmarksConfig(tasks=["tiny_arith"], include_path=[str(TASKS)]))
    assert [t.task_name for t in tasks] == ["tiny_arith"] and "arc_easy" not in tm.task_index
    assert len(tasks[0].test_docs()) == 12
    # a local file that is not there: found before any compute (the pipeline's preflight)
    with pytest.raises(benchmarks.BenchmarkError, match="file not found: nowhere/task.yaml"):
        benchmarks.check_benchmarks(BenchmarksConfig(tasks=["nowhere/task.yaml"]))


def test_the_evaluate_stage_is_measured_again_when_a_benchmark_setting_or_file_changes(tmp_path):
    from dpo_engine.stages.evaluate import key

    tasks = shutil.copytree(TASKS, tmp_path / "tasks")
    trained = {"fingerprint": "t"}
    cfg = lambda **b: load_config(overrides={f"eval.benchmarks.{k}": v for k, v in b.items()})  # noqa: E731
    base = key(cfg(tasks=[str(tasks)], limit=5), trained)
    assert base == key(cfg(tasks=[str(tasks)], limit=5), trained)
    assert base != key(cfg(tasks=[str(tasks)], limit=6), trained)
    assert base != key(cfg(), trained)
    data = tasks / "tiny_arith.jsonl"
    data.write_text(data.read_text().replace('"answer": 0', '"answer": 1', 1))  # the task's data edited
    assert base != key(cfg(tasks=[str(tasks)], limit=5), trained)
    # a YAML given as a file: its data file counts too
    one = key(cfg(tasks=[str(tasks / "tiny_arith.yaml")]), trained)
    data.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")
    assert one != key(cfg(tasks=[str(tasks / "tiny_arith.yaml")]), trained)


def test_max_drop_gate_names_the_task_both_values_and_the_allowed_drop():
    metrics = {"bench/tiny_arith/acc": 0.5, "bench_ref/tiny_arith/acc": 0.52}
    assert _gate(metrics, {}, {"bench/tiny_arith/acc": 0.02}) == []  # lost 0.02: allowed
    assert _gate(metrics, {}, {"bench/tiny_arith/acc": 0.05}) == []
    reasons = _gate(metrics, {}, {"bench/tiny_arith/acc": 0.01})
    assert reasons == ["bench/tiny_arith/acc: task tiny_arith policy 0.5 vs reference 0.52: lost 0.02, "
                       "more than the allowed drop 0.01"]
    # a better policy passes with no allowed drop; a missing reference value fails, named
    assert _gate({"bench/t/acc": 0.6, "bench_ref/t/acc": 0.5}, {}, {"bench/t/acc": 0.0}) == []
    missing = _gate({"bench/t/acc": 0.6}, {}, {"bench/t/acc": 0.01})
    assert len(missing) == 1 and "bench_ref/t/acc missing from metrics" in missing[0] and "task t" in missing[0]
    # absolute minimums on bench/ metrics are the plain thresholds
    assert _gate(metrics, {"bench/tiny_arith/acc": 0.6}) == ["bench/tiny_arith/acc: 0.5 < required 0.6"]


def test_max_drop_config_takes_benchmark_metrics_only():
    cfg = load_config(overrides={"registry.gate.max_drop": {"bench/arc_easy/acc": 0.01}})
    assert cfg.registry.gate.max_drop == {"bench/arc_easy/acc": 0.01}
    with pytest.raises(ConfigError, match=r"registry.gate.max_drop: 'eval/win_rate' is not a benchmark metric"):
        load_config(overrides={"registry.gate.max_drop": {"eval/win_rate": 0.01}})
    with pytest.raises(ConfigError, match=r"registry.gate.max_drop.bench/t/acc: Input should be greater"):
        load_config(overrides={"registry.gate.max_drop": {"bench/t/acc": -0.1}})
    with pytest.raises(ConfigError, match=r"eval.benchmarks.limit"):
        load_config(overrides={"eval.benchmarks.limit": 0})


def test_the_pipeline_logs_benchmarks_and_gates_on_them(tmp_path, monkeypatch):
    """The stages in process (no Prefect) on a tiny model: the evaluate stage measures both models,
    MLflow has the metrics, and the register stage's gate applies registry.gate.max_drop."""
    from mlflow import MlflowClient

    from dpo_engine.pipeline import new_run_dir, preflight
    from dpo_engine.stages import evaluate, precompute, register, train, validate

    monkeypatch.setenv("DPO_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)  # the state home's then
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "chosen": f" {2 * a}", "rejected": f" {a}"}) + "\n"
                             for a in range(1, 7)))
    cfg = load_config(overrides={
        "run_name": "bench", "model.name_or_path": str(tiny_model_dir(tmp_path / "policy", seed=0)),
        "reference.model_path": str(tiny_model_dir(tmp_path / "reference", seed=1)),
        "data.source": str(pairs), "data.eval_fraction": 0.34, "data.max_length": 64,
        "train.per_device_train_batch_size": 2, "train.max_steps": 1, "train.save_steps": 10,
        "eval.num_prompts": 0, "reference.batch_size": 8, "tracking.system_metrics_interval_s": 0,
        "eval.benchmarks.tasks": [str(TASKS)], "eval.benchmarks.limit": LIMIT,
        "registry.experiment": "bench", "registry.model_name": "tiny-bench",
        "registry.gate.max_drop": {"bench/tiny_arith/acc": 0.0, "bench/not_run/acc": 0.01}})
    preflight(cfg)
    run_dir = new_run_dir(cfg)
    validated = validate.run(cfg, run_dir)
    precomputed = precompute.run(cfg, run_dir, validated)
    trained = train.run(cfg, run_dir, validated, precomputed)
    evaluated = evaluate.run(cfg, run_dir, validated, precomputed, trained)
    m = evaluated["metrics"]
    assert {"bench/tiny_arith/acc", "bench_ref/tiny_arith/acc", "bench_delta/tiny_arith/acc"} <= set(m)
    assert json.loads((run_dir / "evaluate" / "metrics.json").read_text())["bench/tiny_arith/acc"] == \
        m["bench/tiny_arith/acc"]
    assert any((tmp_path / "home" / "hf" / "datasets").rglob("*.arrow"))  # under the state home

    registered = register.run(cfg, run_dir, validated, trained, evaluated)
    reasons = registered["gate_reasons"]
    assert not registered["gate_passed"] and "champion" not in registered["aliases"]
    assert any(r.startswith("bench/not_run/acc: bench/not_run/acc and bench_ref/not_run/acc missing")
               for r in reasons)
    lost = m["bench/tiny_arith/acc"] < m["bench_ref/tiny_arith/acc"]
    assert any(r.startswith("bench/tiny_arith/acc: task tiny_arith policy") for r in reasons) == lost
    logged = MlflowClient().get_run(trained["mlflow_run_id"]).data.metrics
    for k in ("bench/tiny_arith/acc", "bench_ref/tiny_arith/acc", "bench_delta/tiny_arith/acc"):
        assert logged[k] == pytest.approx(m[k])
