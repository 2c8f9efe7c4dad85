"""Named evaluation sets (issue 18, ``eval.sets``): each set validated to its own folder, precomputed
under its own cache key and evaluated with its own judge, prompt count and metrics prefix, beside the
default held-out split, whose metrics stay exactly as without sets. The stages run in process (no
Prefect) on a tiny random model, once for the module."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tiny import tiny_model_dir

from data_contracts.config import ConfigError, RunConfig, load_config
from data_contracts.config.describe import commented_yaml
from data_contracts.config.run import validate as validate_config
from data_contracts.helpers import fingerprint
from dpo_engine.tracking.registration import _gate


def length_score(prompt, response, row):
    """Pointwise: the longer response scores higher."""
    return float(len(response))


def prefers_a(prompt, response_a, response_b, row):
    """Pairwise: a mild preference for the response read first (cancels to 0.5 over both orders)."""
    return 0.6


def _pairs(path: Path, n: int, start: int, bad_row_at: int | None = None) -> Path:
    rows = [{"prompt": f"{a}+{a}=", "chosen": f" {2 * a}", "rejected": f" {a + 1}"} for a in range(start, start + n)]
    if bad_row_at is not None:
        rows.insert(bad_row_at, {"prompt": "1+1=", "chosen": " 2"})  # no rejected: rejected by row
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("overrides, field", [
    ({"eval.sets.bad-name.source": "x.jsonl"}, r"eval\.sets: set name 'bad-name'"),
    ({"eval.sets.train.source": "x.jsonl"}, r"eval\.sets: set name 'train' is reserved"),
    ({"eval.sets.a.source": "x.jsonl", "eval.sets.a.prefix": "eval/"}, r"eval\.sets\.a\.prefix: may not start with 'eval/'"),
    ({"eval.sets.a.source": "x.jsonl", "eval.sets.a.prefix": "eval/safety/"}, r"eval\.sets\.a\.prefix: may not start"),
    ({"eval.sets.a.source": "x.jsonl", "eval.sets.a.prefix": "safety"}, r"eval\.sets\.a\.prefix: must be .* ending in '/'"),
    ({"eval.sets.a.source": "x.jsonl", "eval.sets.b.source": "y.jsonl", "eval.sets.b.prefix": "eval_a/"},
     r"eval\.sets: sets a and b: metric prefixes 'eval_a/' and 'eval_a/' overlap"),
    ({"eval.sets.a.prefix": "mine/"}, r"eval\.sets\.a\.source: Field required"),
    ({"eval.sets.a.source": "x.jsonl", "eval.sets.a.num_prompts": -1}, r"eval\.sets\.a\.num_prompts"),
    ({"eval.sets.a.source": "x.jsonl", "eval.sets.a.judges": "x"}, r"eval\.sets\.a\.judges: unknown field"),
])
def test_bad_sets_are_one_line_config_errors_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field) as e:
        load_config(overrides=overrides)
    assert "\n" not in str(e.value)


def test_set_defaults_inherit_and_null_disables_the_judge():
    cfg = load_config(overrides={"eval.judge": "test_eval_sets:length_score", "eval.sets.safety.source": "s.jsonl",
                                 "eval.sets.quiet.source": "q.jsonl", "eval.sets.quiet.judge": None,
                                 "eval.sets.quiet.prefix": "q/"})
    assert cfg.eval.set_judge("safety") == "test_eval_sets:length_score"
    assert cfg.eval.set_judge("quiet") is None
    assert cfg.eval.sets["safety"].metric_prefix("safety") == "eval_safety/"
    assert cfg.eval.sets["quiet"].metric_prefix("quiet") == "q/"
    # a bare builtin set means its held-out split, never the train split
    assert load_config(overrides={"eval.sets.b.source": "builtin:answer-format"}).eval.sets["b"].resolved_source() \
        == "builtin:answer-format@eval"


def test_config_show_lists_the_set_fields_and_loads_back():
    text = commented_yaml(RunConfig())
    assert "  sets: {}" in text and "# <name>.prefix: Metric prefix" in text and "# <name>.judge:" in text
    cfg = load_config(overrides={"eval.sets.safety.source": "s.jsonl", "eval.sets.safety.num_prompts": 4})
    text = commented_yaml(cfg)
    assert "  sets:\n    safety:\n" in text and "      num_prompts: 4" in text
    assert validate_config(yaml.safe_load(text)) == cfg


def test_no_sets_saves_and_hashes_as_before():
    cfg = RunConfig()
    assert "sets" not in cfg.eval.model_dump() and "sets:" not in cfg.to_yaml()
    with_sets = load_config(overrides={"eval.sets.s.source": "s.jsonl"})
    assert with_sets.section_hash("eval") != cfg.section_hash("eval")  # a set is part of the eval config


def test_gate_reads_prefixed_metric_names():
    m = {"eval/win_rate": 0.9, "eval_safety/win_rate": 0.4}
    assert _gate(m, {"eval_safety/win_rate": 0.3}) == []
    assert _gate(m, {"eval_safety/win_rate": 0.5}) == ["eval_safety/win_rate: 0.4 < required 0.5"]
    assert _gate(m, {"eval_other/win_rate": 0.5}) == ["eval_other/win_rate: missing from metrics (required >= 0.5)"]


def test_preflight_names_a_set_file_and_judge(tmp_path):
    from dpo_engine.evaluation import EvaluationError
    from dpo_engine.pipeline import preflight

    base = {"registry.enabled": False, "eval.judge": None}
    with pytest.raises(ConfigError, match=r"eval\.sets\.s\.source: file not found: /nowhere/s\.jsonl"):
        preflight(load_config(overrides={**base, "eval.sets.s.source": "/nowhere/s.jsonl"}))
    with pytest.raises(EvaluationError, match=r"^eval\.sets\.s\.judge 'nomodule_xyz:f' cannot be imported"):
        preflight(load_config(overrides={**base, "eval.sets.s.source": str(_pairs(tmp_path / "s.jsonl", 2, 1)),
                                         "eval.sets.s.judge": "nomodule_xyz:f"}))


# -------------------------------------------------------------------------------------------- pipeline

@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """validate, precompute, train (1 step), evaluate and register with two named sets: ``a`` (pairwise
    judge, 2 prompts, limit 3) and ``b`` (no judge, 3 prompts, 4 new tokens, one bad row)."""
    from dpo_engine.pipeline import new_run_dir, preflight
    from dpo_engine.stages import evaluate, precompute, register, train, validate

    tmp = tmp_path_factory.mktemp("sets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPO_HOME", str(tmp / "home"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        base = {
            "model.name_or_path": str(tiny_model_dir(tmp / "policy", seed=0)),
            "data.source": str(_pairs(tmp / "train.jsonl", 8, 1)), "data.eval_fraction": 0.3,
            "data.max_length": 64, "data.max_invalid_fraction": 0.5,
            "train.per_device_train_batch_size": 2, "train.max_steps": 1, "train.save_steps": 10,
            "eval.num_prompts": 1, "eval.max_new_tokens": 6, "eval.judge": "test_eval_sets:length_score",
            "reference.batch_size": 8, "tracking.system_metrics_interval_s": 0,
            "registry.experiment": "sets", "registry.model_name": "tiny-sets"}
        sets = {"eval.sets.a.source": str(_pairs(tmp / "a.jsonl", 5, 20)), "eval.sets.a.limit": 3,
                "eval.sets.a.num_prompts": 2, "eval.sets.a.judge": "pairwise:test_eval_sets:prefers_a",
                "eval.sets.b.source": str(_pairs(tmp / "b.jsonl", 5, 40, bad_row_at=2)),
                "eval.sets.b.judge": None, "eval.sets.b.num_prompts": 3, "eval.sets.b.max_new_tokens": 4,
                "registry.gate.thresholds": {"eval_a/rewards/accuracies": 0.0, "eval_b/rewards/accuracies": 2.0}}
        cfg = load_config(overrides={**base, "run_name": "sets", **sets})
        preflight(cfg)
        run_dir = new_run_dir(cfg)
        res = {"cfg": cfg, "run_dir": run_dir, "validated": validate.run(cfg, run_dir)}
        res["precomputed"] = precompute.run(cfg, run_dir, res["validated"])
        res["trained"] = train.run(cfg, run_dir, res["validated"], res["precomputed"])
        res["evaluated"] = evaluate.run(cfg, run_dir, res["validated"], res["precomputed"], res["trained"])
        res["registered"] = register.run(cfg, run_dir, res["validated"], res["trained"], res["evaluated"])
        # the same run without sets: every upstream result as is, the evaluation alone again
        plain = load_config(overrides={**base, "run_name": "plain"})
        plain_dir = new_run_dir(plain)
        res["plain_cfg"], res["plain_validated"] = plain, validate.run(plain, plain_dir)
        res["plain_precomputed"] = precompute.run(plain, plain_dir, res["plain_validated"])
        res["plain_trained"] = train.run(plain, plain_dir, res["plain_validated"], res["plain_precomputed"])
        res["plain_evaluated"] = evaluate.run(plain, plain_dir, res["plain_validated"], res["plain_precomputed"],
                                              res["plain_trained"])
        yield res


def test_each_set_is_validated_to_its_own_folder_with_its_bad_rows_by_row(pipeline):
    v, run_dir = pipeline["validated"], pipeline["run_dir"]
    assert set(v["sets"]) == {"a", "b"}
    for name in ("a", "b"):
        assert v["sets"][name]["valid"] == str(run_dir / "validate" / "sets" / name / "valid.parquet")
        assert Path(v["sets"][name]["report"]).is_file()
    assert v["sets"]["a"]["rows"] == 3 and v["metrics"]["data/a_pairs"] == 3  # eval.sets.a.limit
    assert v["sets"]["b"]["rows"] == 5 and v["sets"]["b"]["rows_in"] == 6 and v["sets"]["b"]["rejected"] == 1
    assert v["metrics"]["data/b_pairs"] == 5 and v["metrics"]["data/b_rejected"] == 1
    rejects = pd.read_parquet(v["sets"]["b"]["rejects"])
    assert rejects["source_index"].tolist() == [2] and rejects["field"].tolist() == ["rejected"]
    report = json.loads(Path(v["sets"]["b"]["report"]).read_text())
    assert report["split"] == "eval.sets.b" and report["rejected"] == 1
    assert ", set b 5/6 valid (1 rejected)" in v["summary"]
    # the default splits as without sets
    assert v["eval"] == {**pipeline["plain_validated"]["eval"], **{k: v["eval"][k] for k in ("valid", "rejects", "report")}}


def test_each_set_gets_its_own_reference_cache_and_training_ignores_the_sets(pipeline):
    from dpo_engine.stages import precompute, train, validate

    p, plain = pipeline["precomputed"], pipeline["plain_precomputed"]
    keys = {p["eval_ref_key"], p["sets"]["a"]["ref_key"], p["sets"]["b"]["ref_key"]}
    assert len(keys) == 3 and all(Path(s["ref"], "_COMPLETE.json").is_file() for s in p["sets"].values())
    assert p["eval_ref_key"] == plain["eval_ref_key"] and "sets" not in plain
    assert p["fingerprint"] != plain["fingerprint"]  # the sets are part of the stage's key ...
    assert p["training_fingerprint"] == plain["training_fingerprint"] == plain["fingerprint"]  # ... not training's
    assert train.key(pipeline["cfg"], p) == train.key(pipeline["plain_cfg"], plain)
    assert pipeline["plain_trained"]["reused"]  # the run without sets trained nothing again
    assert " + 3 a + 5 b" in p["summary"]
    # without sets the stage keys are the formulas they were before sets existed
    cfg, pv = pipeline["plain_cfg"], pipeline["plain_validated"]
    inputs = validate.resolve(cfg)
    assert validate.key(cfg, inputs=inputs) == fingerprint("validate", inputs.data_fingerprint,
                                                           inputs.tokenizer_fingerprint, cfg.section_hash("data"))
    assert precompute.key(cfg, pv) == fingerprint("precompute", *precompute.cache_keys(cfg, pv).values())
    assert validate.key(pipeline["cfg"], inputs=validate.resolve(pipeline["cfg"])) != pv["fingerprint"]


def test_each_set_is_evaluated_with_its_judge_prompts_and_prefix(pipeline):
    e, run_dir = pipeline["evaluated"], pipeline["run_dir"]
    m = e["metrics"]
    # a: pairwise judge on 2 prompts
    a = [json.loads(line) for line in (run_dir / "evaluate" / "sets" / "a" / "samples.jsonl").read_text().splitlines()]
    assert len(a) == 2 and all("p_policy_first" in r and "win" in r for r in a)
    assert m["eval_a/win_rate"] == pytest.approx(0.5) and m["eval_a/judge_disagreement"] == 1.0
    assert "eval_a/lc_win_rate" in m and "eval_a/policy_score" not in m  # pairwise: no pointwise scores
    assert {"eval_a/rewards/accuracies", "eval_a/loss", "eval_a/kl_policy_reference"} <= set(m)
    # b: no judge, 3 prompts of at most 4 new tokens
    b = [json.loads(line) for line in (run_dir / "evaluate" / "sets" / "b" / "samples.jsonl").read_text().splitlines()]
    assert len(b) == 3 and all("win" not in r and "policy_response" in r for r in b)
    assert not any(k.startswith("eval_b/win_rate") for k in m) and m["eval_b/policy_response_tokens_max"] <= 4
    assert "eval_b/rewards/accuracies" in m
    # the default split: its pointwise judge on 1 prompt, under eval/
    default = (run_dir / "evaluate" / "samples.jsonl").read_text().splitlines()
    assert len(default) == 1 and "policy_score" in json.loads(default[0]) and "eval/policy_score" in m
    assert e["sets"]["a"]["num_prompts"] == 2 and e["sets"]["b"]["prefix"] == "eval_b/"
    assert json.loads((run_dir / "evaluate" / "metrics.json").read_text()) == pytest.approx(m)
    assert "; set a: accuracy" in e["summary"] and f"win-rate {m['eval_a/win_rate']:.2f}" in e["summary"]
    assert "; set b: accuracy" in e["summary"] and "no judge" in e["summary"]
    json.dumps(e), json.dumps(pipeline["validated"]), json.dumps(pipeline["precomputed"])  # Prefect's JSON results


def test_no_sets_leaves_the_default_metrics_unchanged(pipeline):
    with_sets, plain = pipeline["evaluated"]["metrics"], pipeline["plain_evaluated"]["metrics"]
    assert set(plain) == {k for k in with_sets if k.startswith("eval/")}
    assert plain == pytest.approx({k: with_sets[k] for k in plain})
    assert "sets" not in pipeline["plain_evaluated"] and "sets" not in pipeline["plain_validated"]
    assert not (Path(pipeline["plain_evaluated"]["run_dir"]) / "evaluate" / "sets").exists()
    assert "; set" not in pipeline["plain_evaluated"]["summary"]


def test_sets_are_logged_to_mlflow_and_gated_by_prefix(pipeline):
    from mlflow import MlflowClient

    reg, run_id = pipeline["registered"], pipeline["trained"]["mlflow_run_id"]
    assert not reg["gate_passed"]
    assert [r for r in reg["gate_reasons"] if r.startswith("eval_")] == \
        [f"eval_b/rewards/accuracies: {pipeline['evaluated']['metrics']['eval_b/rewards/accuracies']:.4g} < required 2"]
    client = MlflowClient()
    logged = client.get_run(run_id).data.metrics
    assert logged["eval_a/win_rate"] == pytest.approx(pipeline["evaluated"]["metrics"]["eval_a/win_rate"])
    assert "eval_b/rewards/accuracies" in logged
    files = {f.path for f in client.list_artifacts(run_id, "evaluation/sets/a")}
    assert {"evaluation/sets/a/samples.jsonl", "evaluation/sets/a/samples_table.json"} <= files
