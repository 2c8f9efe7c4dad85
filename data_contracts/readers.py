"""Bounded readers of whole-document files: a ``.json`` document streamed element by element, CSV
record by record (Parquet: :mod:`data_contracts.parquet_reader`). Memory stays bounded whatever the
file: an element or CSV record over ``cap`` bytes (decompressed) is never held whole and becomes a
ROW_TOO_LARGE marker row, JSON nested deeper than the parser can go a TOO_DEEP one, an element that
does not parse a BAD_JSON one. Marker rows are ``{"__error__": ..., "__code__": ..., "__raw__": ...}``
(validation rejects them with that code); their raw text is at most ``RAW_KEPT`` characters.
Batches are :class:`Rows`, with the size of each row as read (validation's workers bound the bytes
in flight by them); :func:`json_head` writes a rejected row's JSON without writing a huge text whole.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from typing import Any, Iterator

from data_contracts.errors import DataError

RAW_KEPT = 1_000_000  # characters of an unparsable row's raw text a marker row keeps
CHUNK = 1 << 20  # characters read at a time
_DEC = json.JSONDecoder()
_WS = " \t\n\r"
_SKIP_OUT = re.compile(r'["\[\]{},]')  # outside a string: what changes depth or ends a value
_SKIP_IN = re.compile(r'["\\]')  # inside a string: its end or an escape


_JSON = json.JSONEncoder(ensure_ascii=False, default=str)
_ESCAPED = re.compile(r'[\x00-\x1f"\\]')  # what JSON (ensure_ascii=False) writes as an escape


def _escaped_len(s: str) -> int:
    """len() of ``s`` written as a JSON string (quotes and escapes included), without writing it."""
    n = len(s) + 2
    if _ESCAPED.search(s) is None:
        return n
    return n + s.count('"') + s.count("\\") + sum(s.count(chr(c)) * (1 if chr(c) in "\b\f\n\r\t" else 5)
                                                  for c in range(32))


def json_head(x: Any, keep: int) -> tuple[str, int]:
    """(text, n): ``n`` is the length of ``x`` written as JSON (ensure_ascii=False, other objects as
    str), ``text`` a JSON text whose first ``keep`` characters are those of it: strings over ``keep``
    characters are written cut (so a huge text is never written whole just to be cut); ``text`` is
    the whole JSON when it has no such string."""
    extra = 0

    def cut(v, depth: int):
        nonlocal extra
        if isinstance(v, str):
            if len(v) <= keep + 1:
                return v
            head = v[:keep + 1]
            extra += _escaped_len(v) - _escaped_len(head)
            return head
        if depth > 64:  # as it is: writing it fails (too deep, circular) as it would have
            return v
        if isinstance(v, dict):
            return {k: cut(w, depth + 1) for k, w in v.items()}
        if isinstance(v, (list, tuple)):
            return [cut(w, depth + 1) for w in v]
        return v

    text = _JSON.encode(cut(x, 0))
    return text, len(text) + extra


class Rows(list):
    """A batch of rows with the size of each as read in ``sizes`` (bytes or characters of its source
    text; 0 for a marker row): validation's workers bound the input in flight by them."""

    def __init__(self, rows=(), sizes: list[int] | None = None):
        super().__init__(rows)
        self.sizes = sizes


def marker(code: str, message: str, raw: str = "") -> dict:
    """A row that validation rejects with ``code`` (raw text cut to RAW_KEPT characters)."""
    if len(raw) > RAW_KEPT:
        raw = raw[:RAW_KEPT] + f"...[cut: {len(raw):,} characters in all]"
    return {"__error__": message, "__code__": code, "__raw__": raw}


class _Text:
    """Characters of a binary file, decoded as UTF-8 (BOM dropped) and buffered in chunks; only
    the unconsumed part of the buffer is kept."""

    def __init__(self, f):
        self.f, self.dec = f, codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.eof, self.offset = "", 0, False, 0  # offset: chars before buf

    def fill(self, need: int) -> None:
        """Read until ``need`` characters are buffered past pos, or the file ends."""
        if self.pos:
            self.offset += self.pos
            self.buf, self.pos = self.buf[self.pos:], 0
        parts, have = [self.buf], len(self.buf)
        while have < need and not self.eof:
            data = self.f.read(max(CHUNK, need - have))
            text = self.dec.decode(data, final=not data)
            self.eof = not data
            parts.append(text)
            have += len(text)
        self.buf = "".join(parts)

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos] if self.pos < len(self.buf) else ""
            self.fill(CHUNK)

    def take(self, ch: str) -> bool:
        if self.peek() == ch:
            self.pos += 1
            return True
        return False

    def skip_value(self) -> int:
        """Skip one JSON value without parsing it (no recursion, one chunk held at a time);
        tolerant of bad syntax: it stops at the ``,``, ``]`` or ``}`` that ends the value at its
        depth. Returns the number of characters skipped."""
        start, depth, in_str = self.offset + self.pos, 0, False
        while True:
            if self.pos >= len(self.buf):
                if self.eof:
                    return self.offset + self.pos - start
                self.fill(CHUNK)
                continue
            m = (_SKIP_IN if in_str else _SKIP_OUT).search(self.buf, self.pos)
            if m is None:
                self.pos = len(self.buf)
                continue
            ch = m.group()
            if in_str:
                if ch == "\\":
                    if m.end() >= len(self.buf) and not self.eof:
                        self.pos = m.start()
                        self.fill(CHUNK)
                        continue
                    self.pos = m.end() + 1
                else:
                    self.pos, in_str = m.end(), False
            elif ch == '"':
                self.pos, in_str = m.end(), True
            elif ch in "[{":
                self.pos, depth = m.end(), depth + 1
            elif depth == 0:  # , ] } ending the value: not consumed
                self.pos = m.start()
                return self.offset + self.pos - start
            else:
                self.pos = m.end()
                depth -= ch in "]}"

    def value(self, cap: int, where: str) -> Any:
        """The next JSON value, or a marker row when it is over ``cap`` characters, too deep or
        invalid (skipped then)."""
        self.peek()
        need = CHUNK
        while True:
            self.fill(need)
            avail = len(self.buf) - self.pos
            try:
                obj, end = _DEC.raw_decode(self.buf, self.pos)
            except RecursionError:
                size = self.skip_value()
                return marker("TOO_DEEP", f"{where}: JSON nested too deep to parse ({size:,} "
                                          "characters, not read); flatten it")
            except json.JSONDecodeError as e:
                incomplete = e.pos >= len(self.buf) - 8 or e.msg.startswith("Unterminated string")
                if incomplete and not self.eof and avail < cap:
                    need = min(2 * avail, cap + 1)
                    continue
                if incomplete and not self.eof:
                    size = self.skip_value()
                    return marker("ROW_TOO_LARGE", f"{where}: {size:,} characters, more than the "
                                                   f"{cap:,} a row may have (not read; split or "
                                                   "shorten it)")
                raw = self.buf[self.pos:self.pos + RAW_KEPT]
                self.skip_value()
                return marker("BAD_JSON", f"{where}: invalid JSON ({e.msg})", raw)
            if end < len(self.buf) or self.eof or avail > cap:  # followed by something: complete
                if end - self.pos > cap:
                    self.pos = end
                    return marker("ROW_TOO_LARGE", f"{where}: more than the {cap:,} characters a row "
                                                   "may have; split or shorten it")
                self.pos = end
                return obj
            need = min(2 * avail, cap + 1)


def iter_json_document(f, name: str, cap: int, batch_rows: int) -> Iterator[list]:
    """Batches of the rows of a JSON document ``[row, ...]`` or ``{"data": [row, ...], ...}`` read
    from the binary file ``f``. Raises DataError for any other document."""
    t = _Text(f)
    top = t.peek()
    wrong = DataError(f"data error: {name}: JSON must be a list of rows or {{\"data\": [...]}}")
    if top == "[":
        last = yield from _array(t, name, cap, batch_rows)
    elif top == "{":
        t.pos += 1
        last = None
        first = True
        while not t.take("}"):
            if not first and not t.take(","):
                raise _broken(name, t, "is not valid JSON (expected ',' or '}')")
            first = False
            key = t.value(cap, f"{name}: key")
            if not isinstance(key, str) or not t.take(":"):
                raise _broken(name, t, "is not valid JSON (expected a key and ':')")
            if key == "data" and t.peek() == "[":
                last = yield from _array(t, name, cap, batch_rows)
            else:
                t.skip_value()
        if last is None:
            raise wrong
    else:
        raise wrong
    if t.peek():
        raise _broken(name, t, "has more after the end of the JSON document")
    if last:
        yield last


def _broken(name: str, t: _Text, why: str) -> DataError:
    """A DataError marked ``not_one_document``: the file may be JSON lines after all."""
    e = DataError(f"data error: {name}: JSON document {why} (character {t.offset + t.pos:,}); "
                     "check the file")
    e.not_one_document = True
    return e


def _array(t: _Text, name: str, cap: int, batch_rows: int):
    """Yields the full batches of the rows of the array at pos; returns the last, partial one."""
    t.pos += 1  # the '['
    batch, size, k = Rows(sizes=[]), 0, 0
    while not t.take("]"):
        if not t.peek():
            raise _broken(name, t, "ends before its closing ']' (truncated?)")
        if k and not t.take(","):
            raise _broken(name, t, "is not valid JSON (expected ',' or ']' between rows)")
        start = t.offset + t.pos
        batch.append(t.value(cap, f"{name}: row {k}"))
        n = t.offset + t.pos - start
        size += n
        batch.sizes.append(n if n <= cap else 0)  # over the cap: a marker row
        k += 1
        if len(batch) >= batch_rows or size > cap:
            yield batch
            batch, size = Rows(sizes=[]), 0
    return batch


def _physical_lines(f, cap: int, state: dict) -> Iterator[str]:
    """Lines of a text file for csv.reader; a line over ``cap`` characters (and the lines its open
    quote runs on to) is skipped in chunks and given as an empty line, noted in ``state``."""
    n = 0
    while True:
        line = f.readline(cap + 1)
        if not line:
            return
        n += 1
        if len(line) <= cap or line.endswith("\n"):
            yield line
            continue
        size, quotes = len(line), line.count('"')
        while line and not (line.endswith("\n") and quotes % 2 == 0):
            line = f.readline(CHUNK)
            size, quotes = size + len(line), quotes + line.count('"')
        state["too_large"] = (n, size)
        yield "\n"


def iter_csv(f, name: str, cap: int, batch_rows: int) -> Iterator[list]:
    """Batches of the rows (dicts of str) of a CSV file ``f`` (binary) with a header line."""
    csv.field_size_limit(max(cap, csv.field_size_limit()))
    state: dict = {}
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    reader = csv.reader(_physical_lines(text, cap, state))
    header = next(reader, None)
    if header is None:
        return
    batch, size = Rows(sizes=[]), 0
    for rec in reader:
        n = 0
        if "too_large" in state:
            line, n = state.pop("too_large")
            batch.append(marker("ROW_TOO_LARGE", f"line {line}: {n:,} characters, more than the "
                                                 f"{cap:,} a row may have (not read; split or "
                                                 "shorten it)"))
        elif not rec:
            continue  # a blank line
        elif len(rec) > len(header):
            batch.append(marker("BAD_CSV", f"line {reader.line_num}: {len(rec)} fields, the header "
                                           f"has {len(header)}", ",".join(rec)))
        else:
            batch.append(dict(zip(header, rec + [None] * (len(header) - len(rec)))))
            n = sum(len(v) for v in rec)
            size += n
        batch.sizes.append(n)
        if len(batch) >= batch_rows or size > cap:
            yield batch
            batch, size = Rows(sizes=[]), 0
    if batch:
        yield batch
