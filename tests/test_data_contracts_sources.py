"""data_contracts.sources (every source kind), split_rows and plan_splits. No tokenizer, no network."""

import gzip
import json
import os

import pandas as pd
import pytest

from data_contracts import sources
from data_contracts.config import DataConfig
from data_contracts.errors import DataError
from data_contracts.sources import load_rows
from data_contracts.validation import plan_splits, split_rows

ROWS = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(4)]


def test_jsonl_json_parquet_csv(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    (tmp_path / "c.json").write_text(json.dumps({"data": ROWS}))
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    pd.DataFrame(ROWS).to_csv(tmp_path / "e.csv", index=False)
    for name in ("a.jsonl", "b.json", "c.json", "d.parquet", "e.csv"):
        assert load_rows(tmp_path / name) == ROWS, name
    assert load_rows(str(tmp_path / "a.jsonl")) == ROWS


def test_gzip_and_folder_of_shards(tmp_path):
    with gzip.open(tmp_path / "x.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    with gzip.open(tmp_path / "y.csv.gz", "wt") as f:
        pd.DataFrame(ROWS).to_csv(f, index=False)
    assert load_rows(tmp_path / "x.jsonl.gz") == ROWS
    assert load_rows(tmp_path / "y.csv.gz") == ROWS
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-1.jsonl").write_text(json.dumps(ROWS[2]) + "\n" + json.dumps(ROWS[3]) + "\n")
    (shards / "part-0.jsonl").write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n")
    (shards / "README.md").write_text("ignored")
    assert load_rows(shards) == ROWS


def test_in_memory_sources():
    import datasets
    assert load_rows(ROWS) == ROWS and load_rows(ROWS) is not ROWS
    assert load_rows(datasets.Dataset.from_list(ROWS)) == ROWS
    assert load_rows(pd.DataFrame(ROWS)) == ROWS


def test_bad_json_line_becomes_a_row(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n{broken\n")
    rows = load_rows(tmp_path / "a.jsonl")
    assert rows[0] == ROWS[0] and rows[1]["__raw__"] == "{broken" and "line 2" in rows[1]["__error__"]


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_rows("./missing/train.parquet")
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown file type"):
        load_rows(tmp_path / "data.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data files"):
        load_rows(tmp_path / "empty")
    (tmp_path / "obj.json").write_text('{"rows": 1}')
    with pytest.raises(DataError, match="list of rows"):
        load_rows(tmp_path / "obj.json")


def test_hub_failure_is_a_data_error(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError(f"cannot reach the hub for {name}")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"cannot load hub dataset 'someone/prefs' split 'test'"):
        load_rows("someone/prefs@test")


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1", reason="needs HF_HUB_OFFLINE=1 (no network)")
def test_hub_offline_real_call(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(DataError, match="cannot load hub dataset"):
        load_rows("no-such-owner/no-such-dataset")


def test_builtin_name_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_HOME", str(tmp_path))
    with pytest.raises(DataError, match="unknown builtin"):
        load_rows("builtin:nothing")
    with pytest.raises(DataError, match="unknown builtin"):
        load_rows("builtin:answer-format@test")


def test_split_rows_deterministic_and_grouped():
    rows = [{"prompt": f"q{i % 200}", "chosen": f"a{i}", "rejected": "b"} for i in range(1000)]
    train, held = split_rows(rows, 0.1, seed=0)
    assert (train, held) == split_rows(rows, 0.1, seed=0)
    assert len(train) + len(held) == 1000 and 50 <= len(held) <= 160
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}  # same prompt, same side
    assert sorted(map(json.dumps, train + held)) == sorted(map(json.dumps, rows))
    assert split_rows(rows, 0.1, seed=1) != (train, held)
    assert split_rows(rows[::-1], 0.1, seed=0)[1] == held[::-1]  # a row's side ignores order
    assert split_rows(rows, 0.0, seed=0) == (rows, [])


def test_plan_splits(tmp_path):
    f = tmp_path / "all.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n"
                         for i in range(100)))
    plan = plan_splits(DataConfig())
    assert plan["eval"] == ("builtin:answer-format@eval", "builtin:answer-format@eval")
    plan = plan_splits(DataConfig(source=str(f), eval_source="other.jsonl"))
    assert plan["eval"][0] == "other.jsonl"
    plan = plan_splits(DataConfig(source=str(f), eval_fraction=0.2))
    assert len(plan["train"][0]) + len(plan["eval"][0]) == 100 and "eval share" in plan["eval"][1]
    assert plan_splits(DataConfig(source=str(f), eval_fraction=0.0))["eval"] is None
    assert sources.describe([1, 2]) == "<in-memory list of 2 rows>"
