"""data_contracts/parquet_reader.py: the rows it gives equal Arrow's, whichever way a row group is
read (Arrow a few rows at a time, or decoded here page by page), for every codec, both data page
versions, dictionary and PLAIN pages, nulls, binary and dictionary-typed columns; a cell over the cap
is a ROW_TOO_LARGE marker and nothing else is; what cannot be read piece by piece is rejected,
saying so; small rows come in the same batches as ``ParquetFile.iter_batches``. A small cap stands
for the real 64 MiB one, so that the files stay small."""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts import parquet_pages
from data_contracts.parquet_reader import iter_parquet

CAP = 4000  # bytes: a page over it is decoded here, a cell over it is a marker row
MARKER = {"__error__", "__code__", "__raw__"}


def _table(n: int, seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    long_text = lambda k: (["é", "a", "字", "🚀"][k % 4] * rng.choice([0, 5, 300, 1100, 1500]))  # noqa: E731
    prompt = [None if k % 11 == 3 else long_text(k) + str(k) for k in range(n)]
    return pa.table({
        "prompt": pa.array(prompt, pa.string()),
        "chosen": pa.array([f"answer {k % 7}" for k in range(n)], pa.large_string()),
        "rejected": pa.array([bytes([k % 256]) * rng.choice([1, 50, 2500]) for k in range(n)], pa.binary()),
        "score": pa.array([k * 0.5 for k in range(n)]),
        "label": pa.DictionaryArray.from_arrays(pa.array([k % 3 for k in range(n)], pa.int32()),
                                                pa.array(["x", "y" * 3000, "z"])),
        "tags": pa.array([[f"t{k}"] * (k % 3) for k in range(n)]),
    })


def _over_cap(row: dict) -> bool:
    return any(isinstance(v, (str, bytes)) and len(v.encode() if isinstance(v, str) else v) > CAP
               for v in row.values())


def _rows(path, cap=CAP, batch_rows=7) -> list[dict]:
    batches = list(iter_parquet(path, cap, batch_rows))
    assert all(0 < len(b) <= batch_rows for b in batches)
    assert all(len(b.sizes) == len(b) for b in batches)
    return [r for b in batches for r in b]


@pytest.mark.parametrize("compression", ["zstd", "gzip", "brotli", "none", "snappy", "lz4"])
@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("dictionary", [True, False])
def test_rows_equal_arrows(tmp_path, monkeypatch, compression, version, dictionary):
    decoded = []  # columns decoded here, not by Arrow
    cells = parquet_pages.column_cells
    monkeypatch.setattr(parquet_pages, "column_cells", lambda f, ch, *a: decoded.append(ch.name) or cells(f, ch, *a))
    table = _table(120)
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, compression=compression, data_page_version=version,
                   use_dictionary=dictionary, row_group_size=50, data_page_size=3000)
    expected = pq.read_table(path).to_pylist()
    got = _rows(path)
    assert len(got) == len(expected) == 120
    streamable = compression in ("zstd", "gzip", "brotli", "none")
    markers = 0
    for k, (row, want) in enumerate(zip(got, expected)):
        if set(row) == MARKER:
            markers += 1
            assert row["__code__"] == "ROW_TOO_LARGE" and row["__error__"].startswith(f"row {k}:")
            # exact where every page can be read piece by piece: only rows with a cell over the cap
            assert _over_cap(want) or not streamable, (k, row)
        else:
            assert row == want, k
            assert not _over_cap(want)
    assert markers >= sum(_over_cap(w) for w in expected) > 0
    assert {"prompt", "rejected"} <= set(decoded), decoded


def test_small_rows_come_in_arrows_batches(tmp_path):
    path = tmp_path / "small.parquet"
    n = 1000
    pq.write_table(pa.table({"prompt": [f"q{k}" for k in range(n)], "chosen": ["a"] * n,
                             "rejected": [None if k % 5 else "b" for k in range(n)]}),
                   path, row_group_size=130)
    want = [rb.to_pylist() for rb in pq.ParquetFile(path).iter_batches(batch_size=64)]
    got = [list(b) for b in iter_parquet(path, 64 * 2**20, 64)]
    assert got == want


def test_a_batch_is_cut_before_it_holds_more_than_the_cap(tmp_path):
    path = tmp_path / "wide.parquet"
    pq.write_table(pa.table({"prompt": ["p" * 900 + str(k) for k in range(40)]}), path,
                   row_group_size=1000, compression="zstd")
    batches = list(iter_parquet(path, CAP, 100))
    assert [r["prompt"] for b in batches for r in b] == ["p" * 900 + str(k) for k in range(40)]
    assert all(sum(b.sizes) <= CAP for b in batches) and len(batches) == 10


def test_a_page_over_the_cap_that_cannot_be_streamed_is_rejected_saying_so(tmp_path):
    path = tmp_path / "snappy.parquet"
    pq.write_table(pa.table({"prompt": ["q0", "P" * 3 * CAP, "q2"], "chosen": ["a", "b", "c"]}), path,
                   compression="snappy")
    rows = _rows(path)
    assert [set(r) == MARKER for r in rows] == [True, True, True]
    assert "cannot be inflated piece by piece" in rows[0]["__error__"]
    assert "rejected without being read" in rows[2]["__error__"]
    pq.write_table(pa.table({"prompt": ["q0", "P" * 3 * CAP, "q2"], "chosen": ["a", "b", "c"]}), path,
                   compression="zstd")
    rows = _rows(path)
    assert rows[0] == {"prompt": "q0", "chosen": "a"} and rows[2] == {"prompt": "q2", "chosen": "c"}
    assert f"a cell of {3 * CAP:,} bytes in column 'prompt'" in rows[1]["__error__"]


def test_a_nested_column_with_a_page_over_the_cap_rejects_its_row_group(tmp_path):
    path = tmp_path / "nested.parquet"
    msgs = [[{"role": "user", "content": "hi"}]] * 3 + [[{"role": "user", "content": "x" * 3 * CAP}]]
    pq.write_table(pa.table({"prompt": msgs * 2, "chosen": ["a"] * 8}), path, row_group_size=4)
    rows = _rows(path)
    assert all(set(r) == MARKER for r in rows[:4]) and "nested column" in rows[0]["__error__"]
    assert rows[4:] == pq.read_table(path).to_pylist()[4:] or all(set(r) == MARKER for r in rows[4:])


def test_a_dictionary_entry_repeated_by_many_rows_is_read_one_row_at_a_time(tmp_path):
    path = tmp_path / "dict.parquet"
    entry = "D" * (CAP // 2)
    prompt = pa.DictionaryArray.from_arrays(pa.array([0] * 50, pa.int32()), pa.array([entry]))
    pq.write_table(pa.table({"prompt": prompt, "chosen": ["a"] * 50}), path)
    batches = list(iter_parquet(path, CAP, 4096))
    assert [r["prompt"] for b in batches for r in b] == [entry] * 50
    assert all(sum(b.sizes) <= CAP for b in batches)
