"""Hostile file formats through validate_split: JSON nested 100,000 deep (.json and a .jsonl line),
a small .json.gz that inflates to 256 MB, a CSV with a 100 MB field, JSON lines each just under the
64 MiB cap; Parquet files under 1 MB holding a 100 MB, 200 MB or 1 GB cell, a row group of eight
20 MB cells (under the cap), one 20 MB dictionary entry repeated by 40 rows, and a 200 MB cell
compressed with snappy (not streamable: its page's rows are rejected, saying so). Each a coded
reject, counts reconcile, peak memory growth of the whole process tree (this process + the forked
validation workers, tests/memory.py) bounded, and not growing with the bomb; each serially
(num_proc=1) and with two workers (num_proc=2: every row is checked to have been prepared by them).

Where the bomb is met: a JSON lines file is split into lines by this process and the lines are
decoded in the workers (the 100,000-deep line is parsed there); a .json document (.gz too), CSV
and Parquet are read by this process (data_contracts/readers.py, parquet_reader.py turn the bomb
into a marker row) and the workers only parse and tokenize the rows they are sent, in parts of
bounded bytes (data_contracts/validation/workers.py; a row over 16 MiB is prepared in this process
rather than copied to a worker and back)."""

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts.config import DataConfig
from data_contracts.validation import validate_split
from memory import peak_rss, worker_batches
from tiny import tiny_tokenizer

RSS_GROWTH_LIMIT = 400 * 2**20  # bytes: the tree's peak (sampled every 5 ms) over its start
GOOD = {"prompt": "What is 1 + 1?", "chosen": "Answer: 2", "rejected": "Answer: 3"}
DEEP = "[" * 100_000 + "]" * 100_000
NUM_PROC = pytest.mark.parametrize("num_proc", [1, 2])


def _validate(src, out, num_proc):
    """(report, rejects by source index, seconds); the tree's peak memory growth checked."""
    cfg = DataConfig(max_length=64, invalid_policy="quarantine", max_invalid_fraction=1.0,
                     num_proc=num_proc)
    with worker_batches(out.parent / f".{out.name}.pids") as pids, peak_rss() as mem:
        rep = validate_split(str(src), out, tiny_tokenizer(), cfg, split="train")
    assert rep["rows_in"] == rep["valid"] + rep["rejected"] + rep["duplicates"] + rep["limited_out"]
    rejects = pq.read_table(out / "rejects.parquet").to_pandas().set_index("source_index")
    assert (rejects["raw"].str.len() < 1_100_000).all()
    if num_proc > 1:  # every row prepared as a part, no batch fell back to serial; the parts in
        # forked workers but for rows over half of workers.WORK_BYTES, prepared in this process
        assert pids.rows == rep["rows_in"] and any(pid != os.getpid() for pid in pids), pids
    else:
        assert not pids
    print(f"{src.name} num_proc={num_proc}: {mem.seconds:.1f}s, tree growth "
          f"{mem.growth / 2**20:.0f} MiB (parts prepared by workers {len(pids)}, workers seen "
          f"{mem.max_children}, this process +{mem.parent_growth / 2**20:.0f} MiB, largest worker "
          f"{mem.max_child_uss / 2**20:.0f} MiB, plain RSS sum peak {mem.peak_rss_sum / 2**20:.0f} MiB), "
          f"{rep['reject_counts']}")
    assert mem.growth < RSS_GROWTH_LIMIT, f"tree memory grew {mem.growth / 2**20:.0f} MiB"
    return rep, rejects, mem.seconds


@NUM_PROC
def test_deep_json_document_and_line(tmp_path, num_proc):
    doc = tmp_path / "deep.json"
    doc.write_text("[" + json.dumps(GOOD) + ", " + DEEP + ", " + json.dumps({**GOOD, "prompt": "x"}) + "]")
    rep, rejects, _ = _validate(doc, tmp_path / "a", num_proc)
    assert rep["rows_in"] == 3 and rep["valid"] == 2 and rejects.loc[1, "code"] == "TOO_DEEP"
    lines = tmp_path / "deep.jsonl"
    lines.write_text(json.dumps(GOOD) + "\n" + DEEP + "\n")
    rep, rejects, _ = _validate(lines, tmp_path / "b", num_proc)
    assert rep["rows_in"] == 2 and rejects.loc[1, "code"] == "TOO_DEEP"
    assert "line 2" in rejects.loc[1, "message"]


@NUM_PROC
def test_gzip_bomb_json(tmp_path, num_proc):
    src = tmp_path / "bomb.json.gz"
    chunk = b"A" * 2**20
    with gzip.open(src, "wb", compresslevel=1) as f:
        f.write(b"[" + json.dumps(GOOD).encode() + b', {"prompt": "')
        for _ in range(256):
            f.write(chunk)
        f.write(b'", "chosen": "a", "rejected": "b"}, ' + json.dumps({**GOOD, "prompt": "y"}).encode() + b"]")
    assert src.stat().st_size < 2 * 2**20
    rep, rejects, seconds = _validate(src, tmp_path / "out", num_proc)
    assert rep["rows_in"] == 3 and rep["valid"] == 2 and rejects.loc[1, "code"] == "ROW_TOO_LARGE"
    assert seconds < 20


@NUM_PROC
def test_csv_with_a_100_mb_field(tmp_path, num_proc):
    src = tmp_path / "big.csv"
    with open(src, "w") as f:
        f.write("prompt,chosen,rejected\nq1,a1,b1\n")
        f.write('"' + "P" * 100 * 2**20 + '",a2,b2\n')
        f.write("q3,a3,b3\n")
    rep, rejects, seconds = _validate(src, tmp_path / "out", num_proc)
    assert rep["rows_in"] == 3 and rep["valid"] == 2 and rejects.loc[1, "code"] == "ROW_TOO_LARGE"
    assert seconds < 20


@NUM_PROC
def test_parquet_row_group_with_a_100_mb_cell(tmp_path, num_proc):
    src = tmp_path / "big.parquet"
    table = pa.table({"prompt": ["q0", "P" * 100 * 2**20, "q2"], "chosen": ["a0", "a1", "a2"],
                      "rejected": ["b0", "b1", "b2"]})
    pq.write_table(table, src, row_group_size=1000, compression="zstd")
    del table
    rep, rejects, seconds = _validate(src, tmp_path / "out", num_proc)
    assert rep["rows_in"] == 3 and rep["valid"] == 2 and rejects.loc[1, "code"] == "ROW_TOO_LARGE"
    assert seconds < 20


@NUM_PROC
def test_json_lines_just_under_the_cap(tmp_path, num_proc):
    """Eight lines of 60 MB (each under the 64 MiB a line may have, TEXT_TOO_LONG once parsed):
    batches of up to two of them, each worked on alone; a reject's raw text cut in the worker."""
    src = tmp_path / "lines.jsonl"
    with open(src, "w") as f:
        for k in range(8):
            f.write(json.dumps({**GOOD, "prompt": "P" * 60 * 2**20 + str(k)}) + "\n")
        f.write(json.dumps(GOOD) + "\n")
    rep, rejects, seconds = _validate(src, tmp_path / "out", num_proc)
    assert rep["reject_counts"] == {"TEXT_TOO_LONG": 8} and rep["valid"] == 1
    n = 60 * 2**20 + 1 + len(json.dumps({**GOOD, "prompt": ""}))  # characters of a row's JSON
    assert rejects["raw"].str.endswith(f"[cut: {n:,} characters in all]").all()
    assert seconds < 30


def _parquet(path, prompts, compression="zstd"):
    n = len(prompts)
    pq.write_table(pa.table({"prompt": prompts, "chosen": ["a"] * n, "rejected": ["b"] * n}), path,
                   row_group_size=1000, compression=compression)
    return path


@NUM_PROC
def test_parquet_row_group_of_cells_under_the_cap(tmp_path, num_proc):
    """One row group of eight 20 MiB cells (a 160 MiB dictionary page, a file under 1 MB):
    streamed from the page, each cell read once, batches cut by bytes (before: +830 MiB serially,
    +1.5 GiB with 2 workers: a record batch held all of them)."""
    src = _parquet(tmp_path / "group.parquet", ["P" * 20 * 2**20 + str(k) for k in range(8)] + ["q"])
    assert src.stat().st_size < 2**20 and pq.ParquetFile(src).metadata.num_row_groups == 1
    rep, _, seconds = _validate(src, tmp_path / "out", num_proc)
    assert rep["reject_counts"] == {"TEXT_TOO_LONG": 8} and rep["valid"] == 1
    assert seconds < 20


@NUM_PROC
@pytest.mark.parametrize("mib", [200, 1024])
def test_parquet_cell_over_the_cap(tmp_path, num_proc, mib):
    """A cell of 200 MiB or 1 GiB in a file of a few KB: never inflated (before: Arrow inflated it,
    ~3x its size); the two small rows of its dictionary page valid."""
    src = _parquet(tmp_path / "cell.parquet", ["q0", "P" * mib * 2**20, "q2"])
    assert src.stat().st_size < 2**20
    rep, rejects, seconds = _validate(src, tmp_path / "out", num_proc)
    assert rep["valid"] == 2 and rejects.loc[1, "code"] == "ROW_TOO_LARGE"
    assert f"a cell of {mib * 2**20:,} bytes in column 'prompt'" in rejects.loc[1, "message"]
    assert seconds < 20


@NUM_PROC
def test_parquet_dictionary_entry_repeated_by_many_rows(tmp_path, num_proc):
    """One 20 MiB dictionary entry that 40 rows refer to (800 MiB of text from a file of a few KB):
    the rows are read one at a time (before: one record batch of all of them)."""
    src, n = tmp_path / "dict.parquet", 40
    prompt = pa.DictionaryArray.from_arrays(pa.array([0] * n + [1], pa.int32()),
                                            pa.array(["P" * 20 * 2**20, GOOD["prompt"]]))
    pq.write_table(pa.table({"prompt": prompt, "chosen": ["a"] * (n + 1), "rejected": ["b"] * (n + 1)}),
                   src, compression="zstd")
    rep, _, seconds = _validate(src, tmp_path / "out", num_proc)
    assert rep["reject_counts"] == {"TEXT_TOO_LONG": n} and rep["valid"] == 1
    assert seconds < 30


@NUM_PROC
def test_parquet_page_over_the_cap_that_cannot_be_streamed(tmp_path, num_proc):
    """The 200 MiB cell compressed with snappy (pages inflate only whole): its dictionary page is
    not read; the rows that use it are rejected, conservatively, and say why."""
    src = _parquet(tmp_path / "snappy.parquet", ["q0", "P" * 200 * 2**20, "q2"], compression="snappy")
    rep, rejects, _ = _validate(src, tmp_path / "out", num_proc)
    assert rep["reject_counts"] == {"ROW_TOO_LARGE": 3}
    for k in range(3):
        assert rejects.loc[k, "message"].startswith(f"row {k}: not read: column 'prompt'")
        assert "cannot be inflated piece by piece" in rejects.loc[k, "message"]
