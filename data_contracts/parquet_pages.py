"""Parquet pages read without Arrow, for :mod:`data_contracts.parquet_reader`: page headers (just
enough Thrift), a page's bytes held whole up to the cap or streamed through its codec, Parquet's
RLE / bit-packed hybrid, PLAIN byte arrays, dictionary pages (streamed, entries read as rows ask for
them, when over the cap), and the cells of a flat string/binary column chunk row by row."""

from __future__ import annotations

import io
import struct
from array import array
from dataclasses import dataclass
from itertools import islice, repeat
from typing import Iterator

import numpy as np

STREAMED = {"ZSTD": "zstd", "GZIP": "gzip", "BROTLI": "brotli"}  # codecs read piece by piece
CODECS = {"SNAPPY": "snappy", "LZ4": "lz4_raw", "LZ4_RAW": "lz4_raw", **STREAMED}  # pyarrow.Codec
CACHE_BYTES, CACHE_ENTRY = 16 * 2**20, 2**16  # small entries kept of a dictionary page over cap
_U32 = struct.Struct("<I")
_END = object()
ENCODINGS = {0: "PLAIN", 2: "PLAIN_DICTIONARY", 5: "DELTA_BINARY_PACKED", 6: "DELTA_LENGTH_BYTE_ARRAY",
             7: "DELTA_BYTE_ARRAY", 8: "RLE_DICTIONARY", 9: "BYTE_STREAM_SPLIT"}


class _Thrift:
    """Just enough of Thrift's compact protocol to read Parquet page headers (binary fields, such
    as statistics, are skipped, not read)."""

    def __init__(self, f):
        self.f = f

    def byte(self) -> int:
        b = self.f.read(1)
        if not b:
            raise ValueError("page header cut short")
        return b[0]

    def varint(self) -> int:
        out = shift = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7
            if shift > 63:
                raise ValueError("bad varint in a page header")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def struct(self, depth: int = 0) -> dict:
        if depth > 8:
            raise ValueError("page header nested too deep")
        out, last = {}, 0
        while True:
            b = self.byte()
            if b == 0:
                return out
            last = last + (b >> 4) if b >> 4 else self.zigzag()
            out[last] = self.value(b & 0x0F, depth)

    def value(self, kind: int, depth: int, in_list: bool = False):
        if kind in (1, 2):
            return self.byte() == 1 if in_list else kind == 1
        if kind == 3:
            return self.byte()
        if kind in (4, 5, 6):
            return self.zigzag()
        if kind in (7, 8):
            self.f.seek(8 if kind == 7 else self.varint(), io.SEEK_CUR)
            return None
        if kind in (9, 10, 11):
            if kind == 11:  # a map: size, then the key and value types in one byte
                n = self.varint()
                both = self.byte() if n else 0
                kinds = [both >> 4, both & 0x0F]
            else:
                h = self.byte()
                n = h >> 4 if h >> 4 != 15 else self.varint()
                kinds = [h & 0x0F]
            if n > 4096:  # a page header holds no long list (statistics are binary)
                raise ValueError("a long list in a page header")
            for _ in range(n):
                for k in kinds:
                    self.value(k, depth + 1, True)
            return None
        if kind == 12:
            return self.struct(depth + 1)
        raise ValueError(f"bad Thrift type {kind} in a page header")


@dataclass
class Page:
    kind: int  # 0 data page, 2 dictionary page, 3 data page v2
    pos: int  # where its payload starts in the file
    comp: int  # payload bytes in the file
    unc: int  # payload bytes inflated
    values: int
    encoding: int
    rows: int  # rows it holds (data pages of a top-level column)
    levels: int = 0  # v2: bytes of repetition + definition levels (not compressed) before the values
    def_bytes: int = 0  # v2: bytes of definition levels
    compressed: bool = True  # v2: the values are compressed
    level_encoding: int = 3  # v1: definition levels' encoding (3: RLE)


def _num(d: dict, key: int, default: int = 0) -> int:
    """Field ``key`` of a page header struct, a count or size: a non-negative int, or ValueError."""
    v = d.get(key, default)
    if v.__class__ is not int or v < 0:
        raise ValueError(f"bad page header field {key}: {v!r}")
    return v


def read_pages(f, cc) -> list[Page]:
    """The pages of column chunk ``cc`` (pyarrow ColumnChunkMetaData), from their headers."""
    start = cc.data_page_offset
    if cc.has_dictionary_page and 0 < cc.dictionary_page_offset < start:
        start = cc.dictionary_page_offset
    end, pages, t = start + cc.total_compressed_size, [], _Thrift(f)
    f.seek(start)
    while f.tell() < end:
        h = t.struct()
        pos, kind, unc, comp = f.tell(), h.get(1), _num(h, 2, -1), _num(h, 3, -1)
        if pos + comp > end:
            raise ValueError("a page runs past its column chunk")
        sub = h.get({0: 5, 2: 7, 3: 8}.get(kind, -1))
        if kind in (0, 2, 3) and not isinstance(sub, dict):
            raise ValueError("page header without its page type's header")
        if kind == 0:
            values = _num(sub, 1)
            pages.append(Page(0, pos, comp, unc, values, _num(sub, 2), values, level_encoding=_num(sub, 3, 3)))
        elif kind == 2:
            pages.append(Page(2, pos, comp, unc, _num(sub, 1), _num(sub, 2), 0))
        elif kind == 3:
            levels, defs = _num(sub, 5) + _num(sub, 6), _num(sub, 5)
            if levels > comp or levels > unc:
                raise ValueError("levels larger than their page")
            pages.append(Page(3, pos, comp, unc, _num(sub, 1), _num(sub, 4), _num(sub, 3), levels, defs,
                              sub.get(7, True) is not False))
        f.seek(pos + comp)
    return pages


class _Slice(io.RawIOBase):
    """``n`` bytes of ``f`` from ``pos``, read as a file (seeks before each read: ``f`` is shared)."""

    def __init__(self, f, pos: int, n: int):
        self.f, self.pos, self.end = f, pos, pos + n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.end - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.pos)
        data = self.f.read(n)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


class Body:
    """A page's (inflated) bytes, read in order: held whole for a page up to the cap, else
    streamed from the file through its codec."""

    def __init__(self, f, pos: int, comp: int, unc: int, codec: str, cap: int):
        import pyarrow as pa

        self.mem = self.data = None
        if unc <= cap:
            f.seek(pos)
            data = f.read(comp)
            if codec == "LZ4":  # Hadoop's framing of LZ4 blocks, or raw blocks (as Arrow reads it)
                data = _lz4(data, unc)
            elif codec != "UNCOMPRESSED":
                data = pa.Codec(CODECS[codec]).decompress(data, decompressed_size=unc).to_pybytes()
            self.data, self.mem = data, io.BytesIO(data)
        else:
            raw = io.BufferedReader(_Slice(f, pos, comp), 2**20)
            self.stream = raw if codec == "UNCOMPRESSED" else pa.CompressedInputStream(raw, STREAMED[codec])

    def read(self, n: int) -> bytes:
        data = (self.mem or self.stream).read(n)
        if len(data) < n:
            raise ValueError("a page ends before its values")
        return data

    def skip(self, n: int) -> None:
        if self.mem is not None:
            self.mem.seek(n, io.SEEK_CUR)
            return
        while n > 0:
            n -= len(self.read(min(n, 2**20)))

    def rest(self) -> bytes:
        return (self.mem or self.stream).read()


def _lz4(data: bytes, unc: int) -> bytes:
    """A page in Parquet's LZ4 codec: Hadoop's frames of LZ4 blocks (big-endian inflated and
    compressed sizes, then the block) when the sizes add up, else one raw block (as Arrow reads it)."""
    import pyarrow as pa

    codec, frames, pos, total = pa.Codec("lz4_raw"), [], 0, 0
    while pos + 8 <= len(data):
        size, comp = struct.unpack_from(">II", data, pos)
        if pos + 8 + comp > len(data) or total + size > unc:
            frames = None
            break
        frames.append((pos + 8, comp, size))
        pos, total = pos + 8 + comp, total + size
    if frames and pos == len(data) and total == unc:
        try:
            return b"".join(codec.decompress(data[a:a + comp], decompressed_size=size).to_pybytes()
                            for a, comp, size in frames)
        except (OSError, ValueError):
            pass
    return codec.decompress(data, decompressed_size=unc).to_pybytes()


def unreadable(codec: str, unc: int, cap: int) -> str | None:
    """Why a page of ``unc`` bytes compressed with ``codec`` cannot be read here, else None."""
    if unc > cap and codec not in STREAMED and codec != "UNCOMPRESSED":
        return (f"a page of {unc:,} bytes (inflated), more than the {cap:,} a row may have, "
                f"compressed with {codec}, which cannot be inflated piece by piece")
    if codec not in CODECS and codec != "UNCOMPRESSED":
        return f"compressed with {codec}, not read here"
    return None


def hybrid(data: bytes, width: int) -> Iterator[int]:
    """The values of Parquet's RLE / bit-packed hybrid encoding of ``width``-bit values in
    ``data``, decoded as they are asked for (a bit-packed run some 64k values at a time)."""
    if not 0 <= width <= 32:
        raise ValueError(f"bad bit width {width}")
    pos, nbytes, powers = 0, (width + 7) // 8, 1 << np.arange(width, dtype=np.int64)
    while pos < len(data):
        header = shift = 0
        while True:
            if pos >= len(data):
                raise ValueError("levels or indices cut short")
            b = data[pos]
            pos += 1
            header |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        count = header >> 1
        if header & 1:  # bit-packed: ``count`` groups of 8 values, ``width`` bytes a group
            if pos + count * width > len(data):
                raise ValueError("levels or indices cut short")
            for start in range(0, count, 8192):
                groups = min(8192, count - start)
                if width:
                    chunk = np.frombuffer(data, np.uint8, groups * width, pos + start * width)
                    bits = np.unpackbits(chunk, bitorder="little").reshape(-1, width)
                    yield from (bits.astype(np.int64) @ powers).tolist()
                else:
                    yield from repeat(0, groups * 8)
            pos += count * width
        else:
            value = int.from_bytes(data[pos:pos + nbytes], "little")
            pos += nbytes
            yield from repeat(value, count)


def plain(body: Body, n: int, cap: int) -> Iterator:
    """``n`` PLAIN byte arrays: bytes, or the size (an int) of one over ``cap`` (skipped)."""
    for _ in range(n):
        size = _U32.unpack(body.read(4))[0]
        if size > cap:
            body.skip(size)
            yield size
        else:
            yield body.read(size)


class Dictionary:
    """A dictionary page's entries by index: held whole up to the cap; a page over it is streamed,
    entries read in order as rows ask for them (small ones kept; one asked for again after being
    passed is found by reading the page again from its start)."""

    def __init__(self, f, page: Page, codec: str, cap: int):
        self.f, self.page, self.codec, self.cap, self.n = f, page, codec, cap, page.values
        self.why = unreadable(codec, page.unc, cap)
        self.data = None
        if self.why is None and page.unc <= cap:
            self.data = Body(f, page.pos, page.comp, page.unc, codec, cap).data
            self.offsets, _ = scan_entries(self.data, self.n)
        self.cache, self.cached, self.big, self.body, self.next = {}, 0, {}, None, 0

    def get(self, j: int):
        """Entry ``j``: bytes, or the size (an int) of one over the cap."""
        if not 0 <= j < self.n:
            raise ValueError(f"dictionary index {j} out of range")
        if self.data is not None:
            start = self.offsets[j]
            return self.data[start:start + _U32.unpack_from(self.data, start - 4)[0]]
        if j in self.cache or j in self.big:
            return self.cache.get(j, self.big.get(j))
        if self.body is None or j < self.next:
            p = self.page
            self.body, self.next = Body(self.f, p.pos, p.comp, p.unc, self.codec, self.cap), 0
        while True:
            size = _U32.unpack(self.body.read(4))[0]
            if size > self.cap:
                self.body.skip(size)
                value = self.big[self.next] = size
            elif self.next == j or (size <= CACHE_ENTRY and self.cached + size <= CACHE_BYTES):
                value = self.body.read(size)
                if size <= CACHE_ENTRY and self.cached + size <= CACHE_BYTES:
                    self.cache[self.next] = value
                    self.cached += size + 64
            else:
                self.body.skip(size)
            self.next += 1
            if self.next > j:
                return value


def scan_entries(data: bytes, n: int) -> tuple[array, int]:
    """(where each of the ``n`` PLAIN byte arrays in ``data`` starts, the longest one's bytes)."""
    offsets, pos, longest, unpack, end = array("q"), 0, 0, _U32.unpack_from, len(data)
    for _ in range(n):
        if pos + 4 > end:
            raise ValueError("a dictionary page ends before its entries")
        size = unpack(data, pos)[0]
        offsets.append(pos + 4)
        pos += 4 + size
        longest = max(longest, size)
    if pos > end:
        raise ValueError("a dictionary page ends before its entries")
    return offsets, longest


def longest_entry(f, pages: list[Page], codec: str, cap: int) -> int:
    """Bytes of the longest entry of the chunk's dictionary page (at most the cap), or the page's
    size when that is small (or its codec not read here)."""
    page = next((p for p in pages if p.kind == 2), None)
    if page is None or page.unc <= 2**16 or unreadable(codec, page.unc, cap) or codec == "LZ4":
        return page.unc if page is not None else 0
    return scan_entries(Body(f, page.pos, page.comp, page.unc, codec, cap).data, page.values)[1]


def column_cells(f, ch, cap: int, first: int) -> Iterator:
    """Per row of a flat string/binary chunk: bytes, None (null), the size (an int) of a cell over
    the cap, or why it is not read (a str)."""
    dictionary, row = None, first
    for page in ch.pages:
        if page.kind == 2:
            dictionary = Dictionary(f, page, ch.codec, cap)
            continue
        if page.kind not in (0, 3):
            continue
        n, end = page.rows, row + page.rows - 1
        codec = ch.codec if page.kind == 0 or page.compressed else "UNCOMPRESSED"
        why = unreadable(codec, page.unc, cap)
        dict_encoded = page.encoding in (2, 8)
        if why is None and dict_encoded and dictionary is not None and dictionary.why:
            why = f"its dictionary page: {dictionary.why}"
        elif why is None and page.encoding not in (0, 2, 8):
            why = f"a page in encoding {ENCODINGS.get(page.encoding, page.encoding)}, not read here"
        elif why is None and (page.level_encoding != 3 or (dict_encoded and dictionary is None)):
            why = "a page not read here (no dictionary page, or levels not in RLE)"
        elif why is None and dict_encoded and page.unc > cap:
            why = f"a page of dictionary indices of {page.unc:,} bytes, more than the {cap:,} a row may have"
        if why is not None:
            note = (f"not read: column '{ch.name}' has {why}; its rows {row:,}-{end:,} are rejected "
                    "without being read, whatever their own size (write the file with smaller "
                    "pages or cells, or zstd)")
            for _ in range(n):
                yield note
            row += n
            continue
        if page.kind == 3:
            if page.levels > min(cap, page.comp):
                raise ValueError(f"levels of {page.levels:,} bytes")
            f.seek(page.pos)
            defs = f.read(page.levels)[page.levels - page.def_bytes:]
            body = Body(f, page.pos + page.levels, page.comp - page.levels, page.unc - page.levels,
                        codec, cap)
        else:
            body = Body(f, page.pos, page.comp, page.unc, ch.codec, cap)
            size = _U32.unpack(body.read(4))[0] if ch.max_def else 0
            if size > cap:
                raise ValueError(f"definition levels of {size:,} bytes")
            defs = body.read(size)
        present = islice(hybrid(defs, 1), n) if ch.max_def else repeat(1, n)
        if dict_encoded:
            width = body.read(1)[0]
            cells = (dictionary.get(j) for j in hybrid(body.rest(), width))
        else:
            cells = plain(body, n, cap)  # as many as asked for: one per row not null
        k = 0
        for k, flag in enumerate(present, 1):
            cell = next(cells, _END) if flag else None
            if cell is _END:
                raise ValueError("a page holds fewer values than its rows")
            yield cell
        if k < n:
            raise ValueError("definition levels cut short")
        row += n
