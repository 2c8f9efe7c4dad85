"""Hostile file formats through validate_split: JSON nested 100,000 deep (.json and a .jsonl line),
a small .json.gz that inflates to 256 MB, a CSV with a 100 MB field, a Parquet row group holding a
100 MB cell. Each a coded reject, counts reconcile, peak RSS growth bounded."""

import gzip
import json
import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.config import DataConfig
from data_contracts.validation import validate_split
from memory import peak_rss
from tiny import tiny_tokenizer

RSS_GROWTH_LIMIT = 400 * 2**20
GOOD = {"prompt": "What is 1 + 1?", "chosen": "Answer: 2", "rejected": "Answer: 3"}
DEEP = "[" * 100_000 + "]" * 100_000


def _validate(src, out):
    """(report, rejects by source index, peak RSS growth in bytes, seconds)."""
    cfg = DataConfig(max_length=64, invalid_policy="quarantine", max_invalid_fraction=1.0)
    with peak_rss() as mem:
        rep = validate_split(str(src), out, tiny_tokenizer(), cfg, split="train")
    seconds = mem.seconds
    assert rep["rows_in"] == rep["valid"] + rep["rejected"] + rep["duplicates"] + rep["limited_out"]
    rejects = pq.read_table(out / "rejects.parquet").to_pandas().set_index("source_index")
    assert (rejects["raw"].str.len() < 1_100_000).all()
    growth = mem.growth
    print(f"{src.name}: {seconds:.1f}s, RSS growth {growth / 2**20:.0f} MiB, {rep['reject_counts']}")
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / 2**20:.0f} MiB"
    return rep, rejects, seconds


def test_deep_json_document_and_line(tmp_path):
    doc = tmp_path / "deep.json"
    doc.write_text("[" + json.dumps(GOOD) + ", " + DEEP + ", " + json.dumps({**GOOD, "prompt": "x"}) + "]")
    rep, rejects, _ = _validate(doc, tmp_path / "a")
    assert rep["rows_in"] == 3 and rep["valid"] == 2 and rejects.loc[1, "code"] == "TOO_DEEP"
    lines = tmp_path / "deep.jsonl"
    lines.write_text(json.dumps(GOOD) + "\n" + DEEP + "\n")
    rep, rejects, _ = _validate(lines, tmp_path / "b")
    assert rep["rows_in"] == 2 and rejects.loc[1, "code"] == "TOO_DEEP"
    assert "line 2" in rejects.loc[1, "message"]


def test_gzip_bomb_json(tmp_path):
    src = tmp_path / "bomb.json.gz"
    chunk = b"A" * 2**20
    with gzip.open(src, "wb", compresslevel=1) as f:
        f.write(b"[" + json.dumps(GOOD).encode() + b', {"prompt": "')
        for _ in range(256):
            f.write(chunk)
        f.write(b'", "chosen": "a", "rejected": "b"}, ' + json.dumps({**GOOD, "prompt": "y"}).encode() + b"]")
    assert src.stat().st_size < 2 * 2**20
    rep, rejects, seconds = _validate(src, tmp_path / "out")
    assert rep["rows_in"] == 3 and rep["valid"] == 2 and rejects.loc[1, "code"] == "ROW_TOO_LARGE"
    assert seconds < 20


def test_csv_with_a_100_mb_field(tmp_path):
    src = tmp_path / "big.csv"
    with open(src, "w") as f:
        f.write("prompt,chosen,rejected\nq1,a1,b1\n")
        f.write('"' + "P" * 100 * 2**20 + '",a2,b2\n')
        f.write("q3,a3,b3\n")
    rep, rejects, seconds = _validate(src, tmp_path / "out")
    assert rep["rows_in"] == 3 and rep["valid"] == 2 and rejects.loc[1, "code"] == "ROW_TOO_LARGE"
    assert seconds < 20


def test_parquet_row_group_with_a_100_mb_cell(tmp_path):
    src = tmp_path / "big.parquet"
    table = pa.table({"prompt": ["q0", "P" * 100 * 2**20, "q2"], "chosen": ["a0", "a1", "a2"],
                      "rejected": ["b0", "b1", "b2"]})
    pq.write_table(table, src, row_group_size=1000, compression="zstd")
    del table
    rep, rejects, seconds = _validate(src, tmp_path / "out")
    assert rep["rows_in"] == 3 and rep["valid"] == 2 and rejects.loc[1, "code"] == "ROW_TOO_LARGE"
    assert seconds < 20
