"""Parallel validation bounded in bytes (data_contracts/validation/workers.py): a batch goes to the
workers in parts, few bytes in flight; the files stay byte-identical to a serial run, for JSON
lines, Parquet and a holdout split, and when a worker dies in the middle of a batch. Small limits
stand for the real ones, so that batches of small rows are cut into many parts."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts.config import DataConfig
from data_contracts.validation import workers
from test_data_contracts import tok  # noqa: F401 (fixture)
from test_validate_parallel import _assert_identical, _run, _standard_lines

_WORK = workers._work


def _counted_work(rows, idx, lines):
    with open(os.environ["PARTS_NOTE"], "a") as f:
        f.write(f"{idx[0]} {len(rows)}\n")
    return _WORK(rows, idx, lines)


def _dying_work(rows, idx, lines):
    if idx[0] <= 700 < idx[0] + len(rows):
        os._exit(1)  # a worker killed in the middle of a batch (OOM killer)
    return _WORK(rows, idx, lines)


@pytest.fixture
def small_parts(monkeypatch, tmp_path):
    monkeypatch.setattr(workers, "part_bytes", lambda n: 3000)
    monkeypatch.setattr(workers, "WORK_BYTES", 9000)
    monkeypatch.setattr(workers, "WINDOW_BYTES", 40_000)
    monkeypatch.setenv("PARTS_NOTE", str(tmp_path / "parts"))
    monkeypatch.setattr(workers, "_work", _counted_work)
    return tmp_path / "parts"


def _loads(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def _parts(note) -> list[tuple[int, int]]:
    return sorted(tuple(map(int, line.split())) for line in note.read_text().split("\n") if line)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_parts_give_the_same_files(tok, tmp_path, small_parts, kind):  # noqa: F811
    lines = _standard_lines(1500, seed=3)
    src = tmp_path / f"rows.{kind}"
    if kind == "jsonl":
        src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        rows = [r for r in map(_loads, lines[:1200]) if isinstance(r, dict) and "\\ud800" not in json.dumps(r)]
        pq.write_table(pa.Table.from_pylist([{k: str(v) if k == "prompt" else v for k, v in r.items()}
                                             for r in rows]), src, row_group_size=300)
    cfg = DataConfig(max_length=64, max_invalid_fraction=1.0)
    a = _run(str(src), tok, tmp_path / "s", cfg, batch_rows=256, num_proc=1)
    b = _run(str(src), tok, tmp_path / "p", cfg, batch_rows=256, num_proc=2)
    assert a == b
    _assert_identical(tmp_path / "s", tmp_path / "p")
    parts = _parts(small_parts)
    assert len(parts) > 3 * (a["rows_in"] // 256 + 1)  # the batches went in many parts
    covered = [i for start, n in parts for i in range(start, start + n)]
    assert covered == list(range(a["rows_in"]))  # each row in one part, none done twice


def test_parts_of_a_holdout_split_give_the_same_files(tok, tmp_path, small_parts):  # noqa: F811
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(_standard_lines(1500, seed=4)) + "\n", encoding="utf-8")
    cfg = DataConfig(max_length=64, max_invalid_fraction=1.0)
    for side in ("train", "eval"):
        a = _run(str(src), tok, tmp_path / f"s{side}", cfg, batch_rows=256, num_proc=1,
                 holdout=(0.3, 7, side))
        b = _run(str(src), tok, tmp_path / f"p{side}", cfg, batch_rows=256, num_proc=2,
                 holdout=(0.3, 7, side))
        assert a == b
        _assert_identical(tmp_path / f"s{side}", tmp_path / f"p{side}")
    assert len(_parts(small_parts)) > 10


def test_a_worker_killed_in_a_part_neither_hangs_nor_changes_the_files(tok, tmp_path, small_parts,  # noqa: F811
                                                                       monkeypatch):
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(_standard_lines(1500, seed=5)) + "\n", encoding="utf-8")
    cfg = DataConfig(max_length=64, max_invalid_fraction=1.0)
    a = _run(str(src), tok, tmp_path / "s", cfg, batch_rows=256, num_proc=1)
    monkeypatch.setattr(workers, "_work", _dying_work)
    b = _run(str(src), tok, tmp_path / "p", cfg, batch_rows=256, num_proc=2)
    assert a == b
    _assert_identical(tmp_path / "s", tmp_path / "p")
