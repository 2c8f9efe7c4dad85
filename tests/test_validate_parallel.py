"""validate_split with worker processes (data.num_proc): the files are byte-identical to a serial run."""

import gzip
import json
import os
import random

import pyarrow.parquet as pq
import pytest

from data_contracts.config import DataConfig
from data_contracts.errors import DataError
from data_contracts.validation import workers as validate_mod
from data_contracts.validation import LARGE_INPUT_ROWS, resolve_num_proc, validate_split
from test_data_contracts import chat_tok, tok  # noqa: F401 (fixtures)

FILES = ("valid.parquet", "rejects.parquet", "report.json", "summary.md")
WORDS = "the a cat dog ran sat on mat big small red blue why how what is café naïve 東京".split()


def _text(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _standard_lines(n: int, seed: int = 0) -> list[str]:
    """JSON lines with duplicates (same batch and earlier batches) and every kind of bad row."""
    rng, lines = random.Random(seed), []
    for i in range(n):
        r = rng.random()
        if lines and r < 0.04:
            lines.append(lines[-rng.randint(1, min(len(lines), 600))])  # duplicate, near or far
            continue
        row = {"prompt": _text(rng, 2, 12) + "?", "chosen": " " + _text(rng, 1, 10) + ".",
               "rejected": " " + _text(rng, 1, 10) + "!", "id": i}
        if r < 0.06:
            row["rejected"] = row["chosen"]  # IDENTICAL_PAIR
        elif r < 0.07:
            del row["chosen"]  # MISSING_FIELD
        elif r < 0.08:
            row["prompt"] = 7  # WRONG_TYPE
        elif r < 0.09:
            row["prompt"] = "   "  # EMPTY_PROMPT
        elif r < 0.10:
            row["prompt"] = _text(rng, 80, 120)  # PROMPT_TOO_LONG at max_length 64
        elif r < 0.11:
            lines.append('{"prompt": "broken", "chosen": ')  # BAD_JSON
            continue
        elif r < 0.12:
            lines.append('{"prompt": "x\\ud800", "chosen": " a", "rejected": " b"}')  # INVALID_UNICODE
            continue
        elif r < 0.13:
            lines.append(json.dumps([1, 2]))  # not an object
            continue
        lines.append(json.dumps(row, ensure_ascii=False))
    return lines


def _run(source, tok, out, cfg, **kw) -> dict:
    rep = validate_split(source, out, tok, cfg, **kw)
    assert rep["rows_in"] == rep["valid"] + rep["rejected"] + rep["duplicates"] + rep["limited_out"]
    return rep


def _assert_identical(a, b):
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_parallel_files_are_byte_identical_to_serial(tok, tmp_path):  # noqa: F811
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(_standard_lines(3000)) + "\n", encoding="utf-8")
    cfg = DataConfig(max_length=64, max_invalid_fraction=1.0)
    serial = _run(str(src), tok, tmp_path / "serial", cfg, batch_rows=256, num_proc=1)
    for n in (2, 3):
        par = _run(str(src), tok, tmp_path / f"par{n}", cfg, batch_rows=256, num_proc=n)
        assert par == serial
        _assert_identical(tmp_path / "serial", tmp_path / f"par{n}")
    codes = set(serial["reject_counts"])
    assert {"IDENTICAL_PAIR", "MISSING_FIELD", "WRONG_TYPE", "EMPTY_PROMPT", "PROMPT_TOO_LONG",
            "BAD_JSON", "INVALID_UNICODE"} <= codes
    assert serial["duplicates"] > 50 and serial["valid"] > 2000
    rejects = pq.read_table(tmp_path / "par2" / "rejects.parquet").to_pylist()
    idx = [r["source_index"] for r in rejects]
    assert idx == sorted(idx) and len(set(idx)) == len(idx)
    assert {r["code"] for r in rejects} == codes | {"DUPLICATE_ROW"}


def test_parallel_folder_of_shards_is_byte_identical(tok, tmp_path):  # noqa: F811
    lines = _standard_lines(1500, seed=1)
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(lines[:700]) + "\n\n", encoding="utf-8")
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[700:1200]) + "\n")
    (folder / "c.json").write_text("\n".join(lines[1200:]) + "\n", encoding="utf-8")  # JSON lines
    cfg = DataConfig(max_length=64, max_invalid_fraction=1.0)
    a = _run(str(folder), tok, tmp_path / "s", cfg, batch_rows=200, num_proc=1)
    b = _run(str(folder), tok, tmp_path / "p", cfg, batch_rows=200, num_proc=2)
    assert a == b and a["rows_in"] == 1500 and "BAD_JSON" in a["reject_counts"]
    _assert_identical(tmp_path / "s", tmp_path / "p")


def test_parallel_conversational_columns_limit_and_holdout(chat_tok, tmp_path):  # noqa: F811
    rng, rows = random.Random(3), []
    for i in range(1200):
        q = _text(rng, 1, 8)
        rows.append({"question": [{"role": "user", "content": q}],
                     "good": [{"role": "assistant", "content": _text(rng, 1, 6)}],
                     "bad": [{"role": "assistant", "content": _text(rng, 1, 6)}]})
        if i % 97 == 0:
            rows[-1]["bad"] = [{"role": "user", "content": "not an answer"}]  # BAD_ROLE_ORDER
        if i % 89 == 0:
            rows.append(dict(rows[-1]))  # duplicate
    cfg = DataConfig(max_length=256, max_invalid_fraction=1.0,
                     columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    for kw in ({"limit": 300}, {"holdout": (0.3, 5, "eval")}, {"holdout": (0.3, 5, "train")}):
        tag = "-".join(map(str, kw))
        a = _run(rows, chat_tok, tmp_path / f"s{tag}", cfg, name="rows", batch_rows=128, num_proc=1, **kw)
        b = _run(rows, chat_tok, tmp_path / f"p{tag}", cfg, name="rows", batch_rows=128, num_proc=2, **kw)
        assert a == b and a["rejected"] > 0 and a["duplicates"] > 0
        _assert_identical(tmp_path / f"s{tag}", tmp_path / f"p{tag}")


def test_parallel_policy_fail_names_the_same_row(tok, tmp_path):  # noqa: F811
    rows = [{"prompt": f"q{i}?", "chosen": " yes", "rejected": " no"} for i in range(900)]
    rows[700] = {"prompt": "q?", "chosen": " same", "rejected": " same"}
    cfg = DataConfig(invalid_policy="fail")
    msgs = []
    for n in (1, 2):
        with pytest.raises(DataError) as e:
            validate_split(rows, tmp_path / f"o{n}", tok, cfg, batch_rows=100, num_proc=n)
        msgs.append(str(e.value))
        assert not (tmp_path / f"o{n}" / "valid.parquet").exists()
    assert msgs[0] == msgs[1] and "row 700" in msgs[0]


def test_num_proc_auto_only_for_large_inputs(tmp_path):
    auto = DataConfig()
    assert resolve_num_proc(auto, [{}] * 100) == 1
    assert resolve_num_proc(auto, [{}] * LARGE_INPUT_ROWS) == min(os.cpu_count() or 1, 8)
    small = tmp_path / "small.jsonl"
    small.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert resolve_num_proc(auto, str(small)) == 1
    assert resolve_num_proc(auto, "builtin:answer-format") == 1
    assert resolve_num_proc(DataConfig(num_proc=3), [{}]) == 3
    assert "num_proc" not in DataConfig(num_proc=3).model_dump()  # not in the config hash


_WORK = validate_mod._work


def _dying_work(rows, idx, lines):
    if idx[0] == 512:
        os._exit(1)  # a worker killed mid-run (OOM killer)
    return _WORK(rows, idx, lines)


def test_a_killed_worker_neither_hangs_nor_changes_the_files(tok, tmp_path, monkeypatch):  # noqa: F811
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(_standard_lines(1500, seed=2)) + "\n", encoding="utf-8")
    cfg = DataConfig(max_length=64, max_invalid_fraction=1.0)
    a = _run(str(src), tok, tmp_path / "s", cfg, batch_rows=256, num_proc=1)
    monkeypatch.setattr(validate_mod, "_work", _dying_work)
    env = os.environ.get("TOKENIZERS_PARALLELISM")
    b = _run(str(src), tok, tmp_path / "p", cfg, batch_rows=256, num_proc=2)
    assert a == b
    _assert_identical(tmp_path / "s", tmp_path / "p")
    assert os.environ.get("TOKENIZERS_PARALLELISM") == env  # restored
