"""Parquet read with memory bounded by the cap, not by the data (the Parquet part of
:mod:`data_contracts.readers`).

Arrow inflates a whole page before it gives a value of it, and a Parquet page can inflate from a
few KB to GBs; a dictionary entry can be repeated by any number of rows. So the page headers of each
column chunk are read first (a few bytes each: the pages are skipped), and what a page would cost
decides how it is read:

- a row group whose string/binary pages each inflate to at most ``cap`` bytes is read by Arrow,
  as many rows at a time as fit ``cap // 4`` bytes by its densest page (a dictionary-encoded page
  counts its longest entry for every row);
- a string/binary column (top level) with a page over ``cap``, or with rows Arrow would have to
  read one at a time (over ``cap // 4``: a long dictionary entry rows repeat), is not given to
  Arrow: it is decoded here page by page (:mod:`data_contracts.parquet_pages`: PLAIN and
  dictionary encodings, data pages v1 and v2), a page over ``cap`` streamed through its codec
  (zstd, gzip, brotli, uncompressed), so a cell over ``cap`` is skipped, never held: its row
  becomes a ROW_TOO_LARGE marker row (``readers.marker``); its other columns are read by Arrow as
  above;
- what cannot be read that way is not read at all, and the rows it covers are ROW_TOO_LARGE marker
  rows that say so: conservatively, some of them may be small. A page over ``cap`` compressed with
  snappy or lz4 (not streamable), or in another encoding, rejects its own rows (a dictionary page:
  the rows of its dictionary-encoded pages); one of a nested string column (lists, structs) rejects
  every row of its row group.

Columns of fixed-width values are always read by Arrow (a cell is a few bytes, whatever the page).
A chunk whose page headers cannot be read (not valid Thrift) is read by Arrow as before, cells over
``cap`` found after Arrow inflated them. Rows come out in batches of ``batch_rows`` rows, cut before
a row that would take one over ``cap`` bytes (a longer row alone): the same batches as
``ParquetFile.iter_batches(batch_size=batch_rows)`` for rows under ``cap / batch_rows`` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from data_contracts import parquet_pages
from data_contracts.parquet_pages import Page
from data_contracts.readers import Rows, marker


@dataclass
class _Chunk:
    """One column chunk of a row group, and how it is read."""
    name: str  # the top-level field it belongs to
    codec: str
    max_def: int
    flat: bool  # a top-level string/binary column (no lists or structs)
    pages: list | None  # None: headers unreadable
    big: Page | None = None  # its first string/binary page over the cap: not for Arrow
    per_row: int = 0  # bytes a row of it may take in Arrow (its densest page)
    own: bool = False  # decoded here (flat, with a page over the cap or rows over read_bytes)


def _value_type(t):
    import pyarrow as pa

    return t.value_type if pa.types.is_dictionary(t) else t


def _is_text(t) -> bool:
    import pyarrow.types as pt

    t = _value_type(t)
    return pt.is_string(t) or pt.is_large_string(t) or pt.is_string_view(t)


def _is_bytes(t) -> bool:
    import pyarrow.types as pt

    t = _value_type(t)
    return _is_text(t) or pt.is_binary(t) or pt.is_large_binary(t) or pt.is_binary_view(t)


def _chunks(pf, f, g: int, cap: int, read_bytes: int) -> list[_Chunk]:
    rg, schema, arrow = pf.metadata.row_group(g), pf.schema, pf.schema_arrow
    rows, out = max(rg.num_rows, 1), []
    for c in range(rg.num_columns):
        cc, col = rg.column(c), schema.column(c)
        name = col.path.split(".")[0]
        t = arrow.field(name).type if name in arrow.names else None
        flat = (t is not None and _is_bytes(t) and col.max_repetition_level == 0
                and col.max_definition_level <= 1 and col.path == name)
        try:
            pages = parquet_pages.read_pages(f, cc)
            if flat and sum(p.rows for p in pages if p.kind != 2) != rg.num_rows:
                raise ValueError("the pages' rows do not add up to the row group's")
        except (ValueError, OSError):
            pages = None  # read by Arrow, as before
        ch = _Chunk(name, cc.compression, col.max_definition_level, flat, pages)
        if pages is None or col.physical_type != "BYTE_ARRAY":
            ch.per_row = cc.total_uncompressed_size // rows + 1
        else:
            ch.big = next((p for p in pages if p.unc > cap), None)
            dict_max = parquet_pages.longest_entry(f, pages, ch.codec, cap) if ch.big is None else cap
            if flat:
                ch.per_row = max([dict_max if p.encoding in (2, 8) else p.unc // max(p.rows, 1) + 1
                                  for p in pages if p.kind != 2] or [0])
            else:  # rows of a nested column's page are not known: its average
                total = sum(p.values * dict_max if p.encoding in (2, 8) else p.unc
                            for p in pages if p.kind != 2)
                ch.per_row = total // rows + 1
            ch.own = flat and (ch.big is not None or ch.per_row > read_bytes)
        out.append(ch)
    return out


def _cell_sizes(rb, cap: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(bytes of each row of record batch ``rb``, rows with a string/binary cell over ``cap`` or
    None). Columns of other types count their buffers shared evenly."""
    import pyarrow.compute as pc
    import pyarrow.types as pt

    sizes, over, other = np.zeros(rb.num_rows, dtype=np.int64), None, 0
    for col in rb.columns:
        t = col.type
        if pt.is_string(t) or pt.is_binary(t) or pt.is_large_string(t) or pt.is_large_binary(t):
            n = pc.binary_length(col).fill_null(0).to_numpy(zero_copy_only=False)
            sizes += n
            over = n > cap if over is None else over | (n > cap)
        else:
            other += col.nbytes
    sizes += other // max(rb.num_rows, 1)
    return sizes, (over if over is not None and over.any() else None)


def _arrow_rows(pf, groups: list[int], columns, read_rows: int, cap: int, first: int):
    """(rows, sizes, rows with a cell over the cap or None) of row groups ``groups`` read by
    Arrow, ``read_rows`` at a time."""
    for rb in pf.iter_batches(batch_size=read_rows, row_groups=groups, columns=columns):
        sizes, over = _cell_sizes(rb, cap)
        if over is None:
            rows = rb.to_pylist()
        else:
            rows = [marker("ROW_TOO_LARGE", f"row {first + k}: a cell of more than {cap:,} bytes "
                                            "(not read; shorten it)")
                    if flag else rb.slice(k, 1).to_pylist()[0] for k, flag in enumerate(over)]
        yield rows, sizes.tolist(), over
        first += len(rows)
        rb = rows = None  # not kept while the next record batch is read


def _own_rows(pf, path, g: int, chunks: list[_Chunk], read_rows: int, cap: int, first: int):
    """(rows, sizes) of row group ``g``, its columns with a page over the cap decoded here."""
    n, names = pf.metadata.row_group(g).num_rows, pf.schema_arrow.names
    nested = next((ch for ch in chunks if ch.big is not None and not ch.flat), None)
    if nested is not None:
        why = (f"not read: column '{nested.name}' of row group {g} (rows {first:,}-{first + n - 1:,}) "
               f"holds a page of {nested.big.unc:,} bytes (inflated), more than the {cap:,} a row "
               "may have, in a nested column, which is not read piece by piece; every row of the "
               "row group is rejected without being read, whatever its own size (write the file "
               "with smaller pages or cells)")
        for k in range(n):
            yield [marker("ROW_TOO_LARGE", f"row {first + k}: {why}")], [0]
        return
    own = {ch.name for ch in chunks if ch.own}
    text = {nm for nm in own if _is_text(pf.schema_arrow.field(nm).type)}
    handles = {name: open(path, "rb") for name in own}
    try:
        cells = {ch.name: parquet_pages.column_cells(handles[ch.name], ch, cap, first)
                 for ch in chunks if ch.name in own}
        rest = [nm for nm in names if nm not in own]
        parts = _arrow_rows(pf, [g], rest, read_rows, cap, first) if rest else (
            ([{}] * min(read_rows, n - k), [0] * min(read_rows, n - k), None) for k in range(0, n, read_rows))
        row = first
        for arows, asizes, over in parts:
            for k, (arow, asize) in enumerate(zip(arows, asizes)):
                got = {nm: next(c) for nm, c in cells.items()}
                bad = next(((nm, v) for nm, v in got.items() if isinstance(v, (int, str))), None)
                if bad is not None or (over is not None and over[k]):
                    nm, v = bad or (None, None)
                    msg = (arow["__error__"] if bad is None else f"row {row}: {v}" if isinstance(v, str)
                           else f"row {row}: a cell of {v:,} bytes in column '{nm}', more than the "
                                f"{cap:,} a row may have (not read; shorten it)")
                    yield [marker("ROW_TOO_LARGE", msg)], [0]
                else:
                    size = asize + sum(len(v) for v in got.values() if v is not None)
                    for nm in text:
                        if got[nm] is not None:
                            got[nm] = got[nm].decode("utf-8")
                    yield [{nm: got[nm] if nm in own else arow[nm] for nm in names}], [size]
                row += 1
                got = None
    finally:
        for h in handles.values():
            h.close()


def iter_parquet(path, cap: int, batch_rows: int) -> Iterator[list]:
    """Batches (:class:`readers.Rows`) of the rows of a Parquet file (see the module docstring)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    md, read_bytes = pf.metadata, max(cap // 4, 1)
    batch, sizes, size, first = Rows(), [], 0, 0
    with open(path, "rb") as f:
        plan = []  # (row group, chunks)
        for g in range(md.num_row_groups):
            plan.append((g, _chunks(pf, f, g, cap, read_bytes)))
        k = 0
        while k < len(plan):
            g, chunks = plan[k]
            per_row = sum(ch.per_row for ch in chunks if not ch.own)
            read_rows = max(1, min(batch_rows, read_bytes // max(per_row, 1)))
            if any(ch.own or ch.big is not None for ch in chunks):
                parts, n = _own_rows(pf, path, g, chunks, read_rows, cap, first), 1
            else:  # consecutive row groups read alike: one Arrow reader
                n = 1
                while k + n < len(plan) and not any(ch.own or ch.big for ch in plan[k + n][1]):
                    more = sum(ch.per_row for ch in plan[k + n][1])
                    if max(1, min(batch_rows, read_bytes // max(more, 1))) != read_rows:
                        break
                    n += 1
                parts = _arrow_rows(pf, [p[0] for p in plan[k:k + n]], None, read_rows, cap, first)
            for rows, row_sizes, *_ in parts:
                for row, s in zip(rows, row_sizes):
                    if batch and size + s > cap:  # cut before a row that would take it over
                        batch.sizes = sizes
                        yield batch
                        batch, sizes, size = Rows(), [], 0
                    batch.append(row)
                    sizes.append(s)
                    size += s
                    if len(batch) >= batch_rows:
                        batch.sizes = sizes
                        yield batch
                        batch, sizes, size = Rows(), [], 0
                first += len(rows)
                rows = row = None
            k += n
    if batch:
        batch.sizes = sizes
        yield batch
