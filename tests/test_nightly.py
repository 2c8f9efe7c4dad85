"""The nightly job: dated/partitioned sources, "skipped: nothing new", eval plots, compare, pyfunc."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest

from tiny import tiny_model_dir

from data_contracts.errors import DataError
from data_contracts.sources import fill_date, load_rows, newest_partition, resolve_source

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ source resolution

def test_date_template_is_filled_with_the_utc_date(monkeypatch):
    assert fill_date("/d/{date}/train.jsonl", dt.date(2026, 1, 2)) == "/d/2026-01-02/train.jsonl"
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    assert fill_date("/d/{date}.jsonl") == f"/d/{today}.jsonl"
    assert fill_date("builtin:answer-format") == "builtin:answer-format"


def test_newest_partition_sorted_by_name(tmp_path):
    (tmp_path / "2026-11-09").mkdir()
    (tmp_path / "2026-11-10.jsonl").write_text("{}\n")
    (tmp_path / ".hidden-2099").mkdir()
    (tmp_path / "zz-notes.txt").write_text("not data")
    assert newest_partition(str(tmp_path)) == str(tmp_path / "2026-11-10.jsonl")
    assert resolve_source(str(tmp_path), "all") == str(tmp_path)
    assert resolve_source(None, "newest") is None
    (tmp_path / "2026-11-11").mkdir()
    assert resolve_source(str(tmp_path), "newest") == str(tmp_path / "2026-11-11")
    with pytest.raises(DataError, match="no partitions"):
        newest_partition(str(tmp_path / "2026-11-11"))
    with pytest.raises(DataError, match="needs a folder"):
        newest_partition(str(tmp_path / "2026-11-10.jsonl"))


def test_preflight_accepts_a_dated_path(dpo_home, tmp_path):
    from data_contracts.config import ConfigError, load_config
    from dpo_engine.pipeline import preflight

    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    cfg = load_config(None, {"data.source": str(tmp_path / "{date}.jsonl"), "eval.judge": None,
                             "registry.enabled": False})
    with pytest.raises(ConfigError, match=today):
        preflight(cfg)
    (tmp_path / f"{today}.jsonl").write_text("{}\n")
    preflight(cfg)


# -------------------------------------------------------------------------------- the nightly flow

def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overrides(model_dir, data: Path, eval_file: Path, **extra):
    return {"model.name_or_path": str(model_dir), "data.source": str(data),
            "data.source_partition": "newest", "data.eval_source": str(eval_file),
            "data.max_length": 256, "train.per_device_train_batch_size": 4, "train.max_steps": 3,
            "train.learning_rate": 1e-3, "train.logging_steps": 1, "eval.num_prompts": 3,
            "eval.max_new_tokens": 4, "eval.batch_size": 4, "reference.batch_size": 8,
            "registry.experiment": "nightly", "registry.model_name": "tiny-nightly",
            "registry.gate.thresholds": {}, "registry.skip_unchanged": True, **extra}


def test_nightly_skips_when_nothing_new_and_compares_runs(dpo_home, tmp_path, capsys):
    import mlflow
    from mlflow import MlflowClient

    from data_contracts.config import load_config

    from data_contracts.state import mlflow_uri
    from dpo_engine import tracking as registry
    from dpo_engine.pipeline import nothing_new
    from flows.cli import main
    from flows.dpo import dpo

    rows = load_rows("builtin:answer-format")
    data = tmp_path / "data"
    _write(data / "2026-11-22.jsonl", rows[:12])
    eval_file = _write(tmp_path / "eval.jsonl", load_rows("builtin:answer-format@eval")[:6])
    tiny = tiny_model_dir(tmp_path / "tiny-model")
    base = _overrides(tiny, data, eval_file)

    # night 1: trains, evaluates (plots + table), registers champion with provenance tags
    s1 = dpo(overrides=base, run_name="night-1")
    assert s1["status"] == "completed" and s1["aliases"] == ["challenger", "champion"]
    run_dir = Path(s1["run_dir"])
    assert json.loads((run_dir / "validate.json").read_text())["sources"]["train"] == \
        str(data / "2026-11-22.jsonl")
    for png in ("training_curves.png", "eval_scores.png"):
        assert (run_dir / "evaluate" / png).read_bytes().startswith(PNG)
    registry.connect(mlflow_uri())
    client = MlflowClient()
    logged = {a.path for a in client.list_artifacts(s1["mlflow_run_id"], "evaluation")}
    assert {"evaluation/training_curves.png", "evaluation/eval_scores.png",
            "evaluation/samples_table.json"} <= logged
    # the samples table is also a Prefect table artifact (prompt, both responses, both scores)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as pc:  # the session's Prefect database: other tests' too
        arts = pc.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["dpo-evaluate-samples"])))
    samples = [json.loads(line) for line in (run_dir / "evaluate" / "samples.jsonl").read_text().splitlines()]
    tables = [json.loads(a.data) if isinstance(a.data, str) else a.data for a in arts if a.type == "table"]
    ours = [t for t in tables if [r.get("example_id") for r in t] == [r["example_id"] for r in samples]]
    assert len(samples) == 3 and ours, [len(t) for t in tables]
    assert {"prompt", "policy_response", "reference_response", "policy_score", "reference_score"} <= set(ours[0][0])
    tags = client.get_model_version("tiny-nightly", "1").tags
    assert {"data_fingerprint", "config_hash", "code_version", "metric.eval/win_rate"} <= set(tags)

    # the champion is a pyfunc that generates text
    text = mlflow.pyfunc.load_model("models:/tiny-nightly@champion").predict(
        ["Hi"], params={"max_new_tokens": 3})
    assert isinstance(text[0], str)

    # night 2: same data, same config -> ends early, not an error
    s2 = dpo(overrides=base, run_name="night-2")
    assert s2["status"] == "skipped" and s2["reason"].startswith("skipped: nothing new")
    assert "version 1" in s2["reason"]
    assert json.loads((Path(s2["run_dir"]) / "summary.json").read_text())["status"] == "skipped"
    assert all(s["status"] == "not run" for s in s2["stages"].values())

    # the gate compares trained models: each new version must beat the champion's held-out reward
    # margin. A barely trained one (lr 1e-7: margin ~0) does not take champion...
    gate = {"registry.gate.beat_champion_metric": "eval/rewards/margins", "registry.gate.min_improvement": 0.0}
    champion_margin = s1["stages"]["evaluate"]["metrics"]["eval/rewards/margins"]
    assert champion_margin > 0.01
    s3 = dpo(overrides={**base, "train.learning_rate": 1e-7, **gate}, run_name="night-3")
    assert s3["status"] == "completed" and s3["registered_version"] == 2
    assert s3["stages"]["evaluate"]["metrics"]["eval/rewards/margins"] < champion_margin
    assert s3["aliases"] == ["challenger"] and s3["gate_passed"] is False
    assert "does not beat champion version 1" in s3["stages"]["register"]["summary"]
    assert "champion stays version 1" in s3["stages"]["register"]["summary"]
    # ...a better one (beta 0.5, twice the steps) does, and the champion loads and generates
    s4 = dpo(overrides={**base, "loss.beta": 0.5, "train.max_steps": 6, **gate}, run_name="night-4")
    assert s4["stages"]["evaluate"]["metrics"]["eval/rewards/margins"] > champion_margin
    assert s4["registered_version"] == 3 and s4["aliases"] == ["challenger", "champion"]
    assert int(client.get_model_version_by_alias("tiny-nightly", "champion").version) == 3
    text = mlflow.pyfunc.load_model("models:/tiny-nightly@champion").predict(["Hi"], params={"max_new_tokens": 3})
    assert isinstance(text[0], str)

    # a new partition is new data for the champion's config
    base4 = {**base, "loss.beta": 0.5, "train.max_steps": 6}
    assert nothing_new(load_config(None, base4)) is not None
    _write(data / "2026-11-23.jsonl", rows[12:24])
    assert nothing_new(load_config(None, base4)) is None

    # compare: the runs with their params, metrics, versions and aliases, and a PNG of their curves
    # and win-rates
    capsys.readouterr()
    plot = tmp_path / "cmp.png"
    assert main(["compare", "--experiment", "nightly", "--last", "3", "--plot", str(plot),
                 "--metric", "eval/rewards/margins", "--metric", "loss"]) == 0
    out = capsys.readouterr().out
    lines = {name: next(line for line in out.splitlines() if name in line)
             for name in ("night-1", "night-3", "night-4")}
    for name, s in (("night-1", s1), ("night-3", s3), ("night-4", s4)):
        margin = s["stages"]["evaluate"]["metrics"]["eval/rewards/margins"]
        numbers = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", lines[name])]
        assert any(abs(x - margin) <= 1e-5 * max(1.0, abs(margin)) for x in numbers), (name, margin, lines[name])
    assert "0.5" in lines["night-4"] and "0.1" in lines["night-1"]  # loss.beta
    assert "tiny-nightly/1" in lines["night-1"] and "tiny-nightly/3" in lines["night-4"]
    assert "tiny-nightly@champion" in lines["night-4"] and "champion" not in lines["night-1"]
    assert f"plot: {plot}" in out and plot.read_bytes().startswith(PNG)
