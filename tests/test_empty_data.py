"""Never a crash, never a hang (issue 14): a dataset whose every row is rejected, an empty input and
an eval split that ends up empty stop at validation with one line naming the split and the top
reasons; the trainer and precompute refuse an empty split instead of looping or crashing."""

import json
import re
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from data_contracts.config import load_config
from data_contracts.errors import DataError, DataPolicyError
from data_contracts.helpers import sha256_file
from dpo_engine.stages import precompute, validate
from dpo_engine.training import pair_order
from dpo_engine.training.errors import TrainingError
from flows.cli import main as cli_main
from tiny import tiny_model_dir

GOOD = [{"prompt": f"Q{i}?", "chosen": f" A{i}.", "rejected": f" B{i}!"} for i in range(60)]
PREFECT_LOG = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| +[A-Z]+ +\| ")
NO_REJECTED = [{"prompt": f"Q{i}?", "chosen": f" A{i}."} for i in range(60)]


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m"))


def _cfg(model_dir, **overrides):
    return load_config(None, {"model.name_or_path": model_dir, **overrides})


def _files(split_dir):
    return {p.name for p in split_dir.iterdir()}


@pytest.mark.parametrize("policy", [{"data.max_invalid_fraction": 1.0}, {}], ids=["quarantine-all", "default"])
def test_every_row_rejected_stops_at_validation(dpo_home, tmp_path, model_dir, policy):
    src = _jsonl(tmp_path / "bad.jsonl", NO_REJECTED)
    cfg = _cfg(model_dir, **{"data.source": src, **policy})
    t0 = time.monotonic()
    with pytest.raises(DataError) as info:
        validate.run(cfg, tmp_path / "run")
    assert time.monotonic() - t0 < 30
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("data error: train split of ")
    assert src in msg and "0 of " in msg and "rows valid" in msg
    assert "top reasons: MISSING_FIELD " in msg and "data.format" in msg
    split_dir = tmp_path / "run" / "validate" / "train"
    assert str(split_dir / "rejects.parquet") in msg
    assert _files(split_dir) >= {"valid.parquet", "rejects.parquet", "report.json"}  # still written
    report = json.loads((split_dir / "report.json").read_text())
    assert report["valid"] == 0 and f"0 of {report['rows_in']} rows valid" in msg
    assert f"MISSING_FIELD {report['reject_counts']['MISSING_FIELD']}" in msg
    assert not (tmp_path / "run" / "validate" / "eval").exists()  # stopped at the first empty split
    # the default policy (5% rejects at most) keeps its class (CLI exit code 2), with the same line
    assert isinstance(info.value, DataPolicyError) == (not policy)


def test_empty_input_file_names_the_split(dpo_home, tmp_path, model_dir):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    cfg = _cfg(model_dir, **{"data.source": str(src), "data.max_invalid_fraction": 1.0})
    with pytest.raises(DataError) as info:
        validate.run(cfg, tmp_path / "run")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"data error: train split of {src}: the source has no rows")
    assert "data.source" in msg


def test_empty_eval_source_stops_at_validation(dpo_home, tmp_path, model_dir):
    train = _jsonl(tmp_path / "train.jsonl", GOOD)
    ev = _jsonl(tmp_path / "eval.jsonl", NO_REJECTED[:10])
    cfg = _cfg(model_dir, **{"data.source": train, "data.eval_source": ev, "data.max_invalid_fraction": 1.0})
    with pytest.raises(DataError) as info:
        validate.run(cfg, tmp_path / "run")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"data error: eval split of {ev}: 0 of 10 rows valid (10 rejected)")
    assert "top reasons: MISSING_FIELD 10" in msg
    out = tmp_path / "run" / "validate"
    assert len(pd.read_parquet(out / "train" / "valid.parquet")) == 60  # train was fine
    assert _files(out / "eval") >= {"valid.parquet", "rejects.parquet", "report.json"}


def test_eval_holdout_with_no_rows_names_eval_fraction(dpo_home, tmp_path, model_dir):
    src = _jsonl(tmp_path / "few.jsonl", GOOD[:3])
    cfg = _cfg(model_dir, **{"data.source": src, "data.eval_fraction": 0.0})
    with pytest.raises(DataError) as info:
        validate.run(cfg, tmp_path / "run")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"data error: eval split of {src}: 0 of the source's 3 rows")
    assert "data.eval_fraction 0.0" in msg and "data.eval_source" in msg


def test_pair_order_of_no_pairs_raises_promptly():
    box = {}

    def call():
        try:
            box["order"] = pair_order(0, 4, 0)
        except Exception as e:  # noqa: BLE001 (handed to the test thread)
            box["error"] = e

    worker = threading.Thread(target=call, daemon=True)  # daemon: a hang must not block the exit
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "pair_order(0, 4, 0) did not return within 5 s"
    assert isinstance(box.get("error"), TrainingError)
    assert "no training pairs" in str(box["error"]) and "\n" not in str(box["error"])
    assert sorted(pair_order(3, 6, 0)) == [0, 0, 1, 1, 2, 2]  # pairs to order: as before


def test_precompute_refuses_an_empty_split(dpo_home, tmp_path, model_dir):
    src = _jsonl(tmp_path / "d.jsonl", GOOD)
    cfg = _cfg(model_dir, **{"data.source": src, "data.eval_fraction": 0.25})
    validated = validate.run(cfg, tmp_path / "run")
    eval_valid = validated["eval"]["valid"]
    pd.read_parquet(eval_valid).iloc[:0].to_parquet(eval_valid)  # as if validate had let it through
    report = Path(eval_valid).parent / "report.json"  # (and recorded it)
    report.write_text(json.dumps({**json.loads(report.read_text()), "valid_sha256": sha256_file(Path(eval_valid))}))
    with pytest.raises(DataError) as info:
        precompute.run(cfg, tmp_path / "run", validated)
    msg = str(info.value)
    assert "\n" not in msg and "eval split" in msg and eval_valid in msg and "no valid rows" in msg


def _prefect_log(line: str) -> bool:
    """A record of Prefect's own console log (time | level | ...) or its server-start hint."""
    return bool(PREFECT_LOG.match(line)) or line.startswith("See https://www.prefect.io")


def test_cli_on_all_rejected_data_is_one_line(dpo_home, tmp_path, model_dir, capsys):
    src = _jsonl(tmp_path / "bad.jsonl", NO_REJECTED)
    sets = ["--set", f"data.source={src}", "--set", f"model.name_or_path={model_dir}",
            "--set", "data.max_invalid_fraction=1.0"]
    # the stage command (no Prefect): stderr is exactly the one line
    capsys.readouterr()
    code = cli_main(["validate", "--run-dir", str(tmp_path / "stage-run"), *sets])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: data error: train split of ") and "MISSING_FIELD" in err
    # the whole flow: one line of its own, besides the records Prefect's logger prints
    code = cli_main(["run", *sets, "--run-name", "empty-data"])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip() and not _prefect_log(line)]
    assert code != 0 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: data error: train split of "), err
    assert "MISSING_FIELD" in lines[0] and "precompute" not in err


def test_a_changed_valid_parquet_is_refused_in_one_line(tmp_path):
    """valid.parquet's sha256 is recorded in report.json and checked by read_valid: a byte changed on
    disk is a one-line DataError naming the file, not other token ids read silently."""
    from data_contracts.config import DataConfig
    from data_contracts.errors import DataError
    from data_contracts.validation import read_valid, validate_split
    from tiny import tiny_tokenizer

    rows = [{"prompt": f"Say {i}.", "chosen": f" {i}!", "rejected": f" no {i}."} for i in range(20)]
    rep = validate_split(rows, tmp_path / "v", tiny_tokenizer(), DataConfig(max_length=256))
    path = tmp_path / "v" / "valid.parquet"
    assert len(read_valid(path)) == 20 and len(rep["valid_sha256"]) == 64
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="valid.parquet differs from what validation wrote") as e:
        read_valid(path)
    assert "\n" not in str(e.value)
