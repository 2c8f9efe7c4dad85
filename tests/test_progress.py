"""Progress bars with ETA: validate (rows when the source knows them, else bytes of the file) and the
evaluation's preference pass (pairs) reach their totals."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tqdm.auto import tqdm

from data_contracts.config import DataConfig
from data_contracts.validation import progress, validate_split
from test_data_contracts import tok  # noqa: F401 (fixture)

CFG = DataConfig(max_length=64)


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"what is {i} plus one?", "chosen": f" {i + 1}", "rejected": f" {i + 2} maybe"}
            for i in range(n)]


@pytest.fixture
def bars(monkeypatch):
    """Every validation bar, as (desc, unit, total, n before done(), n at close)."""
    seen = []

    class Recording(progress._Bar):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False})  # shown although stderr is captured

        def close(self):
            if not getattr(self, "_recorded", False):
                self._recorded = True
                seen.append({"desc": self.desc, "unit": self.unit, "total": self.total, "n": self.n,
                             "updates": self._updates})
            super().close()

        def update(self, n=1):
            self._updates = getattr(self, "_updates", [])
            self._updates.append(n)
            return super().update(n)

    monkeypatch.setattr(progress, "_Bar", Recording)
    return seen


def test_in_memory_rows_bar_reaches_the_row_total(tok, tmp_path, bars, capsys):  # noqa: F811
    validate_split(_rows(50), tmp_path / "out", tok, CFG, batch_rows=16)
    [bar] = bars
    assert (bar["desc"], bar["unit"], bar["total"], bar["n"]) == ("validate train", "row", 50, 50)
    assert bar["updates"] == [16, 16, 16, 2]  # advanced batch by batch, not at the end
    assert "50/50" in capsys.readouterr().err  # the bar itself, on stderr


def test_no_bar_when_stderr_is_not_a_terminal(tok, tmp_path, capsys):  # noqa: F811
    """`dpo validate` piped: its stderr is the one error line, no bar."""
    validate_split(_rows(20), tmp_path / "out", tok, CFG)
    assert capsys.readouterr().err == ""


def test_parquet_bar_counts_the_rows_its_metadata_gives(tok, tmp_path, bars):  # noqa: F811
    src = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(_rows(40)), src)
    assert progress.progress_total(src) == (40, "row")
    validate_split(src, tmp_path / "out", tok, CFG, batch_rows=16)
    assert (bars[0]["total"], bars[0]["n"], bars[0]["unit"]) == (40, 40, "row")


@pytest.mark.parametrize("num_proc", [1, 2])
def test_jsonl_bar_counts_bytes_of_the_file(tok, tmp_path, bars, num_proc):  # noqa: F811
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows(60)) + "\n")  # a blank last line
    size = src.stat().st_size
    assert progress.progress_total(src) == (size, "B")
    rep = validate_split(src, tmp_path / f"out{num_proc}", tok, CFG, batch_rows=16, num_proc=num_proc)
    assert rep["rows_in"] == 60
    [bar] = bars
    assert bar["unit"] == "B" and bar["total"] == size and bar["n"] == size
    assert len(bar["updates"]) >= 4 and sum(bar["updates"][:4]) == size - 1  # the rows' bytes as read


def test_holdout_side_bar_covers_the_whole_source(tok, tmp_path, bars):  # noqa: F811
    rep = validate_split(_rows(50), tmp_path / "out", tok, CFG, split="eval", holdout=(0.2, 0, "eval"))
    assert rep["rows_in"] < 50
    assert (bars[0]["desc"], bars[0]["total"], bars[0]["n"]) == ("validate eval", 50, 50)


def test_unknown_size_counts_rows_without_a_total(tmp_path):
    gz = tmp_path / "train.jsonl.gz"
    gz.write_bytes(b"")
    assert progress.progress_total(gz) == (None, "row")
    assert progress.progress_total(tmp_path) == (None, "row")  # a folder of shards
    assert progress.progress_total("builtin:answer-format") == (None, "row")


def test_preference_pass_bar_reaches_the_pair_total(tmp_path, monkeypatch):
    from data_contracts.config import LossConfig
    from dpo_engine.evaluation import preference
    from dpo_engine.reference import compute_reference_logps
    from test_trainer import _load, _pairs
    from tiny import tiny_model_dir

    model = _load(tiny_model_dir(tmp_path / "m"))
    pairs = _pairs(n=10, seed=1)
    ref = compute_reference_logps(model, pairs, pad_id=0, batch_size=4)
    seen = []

    class Recording(tqdm):
        def close(self):
            if self.total is not None and not getattr(self, "_recorded", False):
                self._recorded = True
                seen.append((self.desc, self.unit, self.total, self.n))
            super().close()

    monkeypatch.setattr(preference, "tqdm", Recording)
    metrics = preference.preference_metrics(model, pairs, ref, loss_cfg=LossConfig(), pad_id=0, batch_size=4)
    assert "eval/loss" in metrics
    assert seen == [("eval preference", "pair", 10, 10)]
