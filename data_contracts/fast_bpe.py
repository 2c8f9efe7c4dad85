"""An exact fast path for byte-level BPE tokenizers (GPT-2, GPT-NeoX, Llama 3, Qwen, SmolLM): a cache
of pre-token -> ids in front of the tokenizer's own BPE model.

Byte-level BPE never merges across pre-tokens, so the ids of a text are the concatenation of the ids
of its pre-tokens; natural text repeats a small set of words, so caching them skips most of the Rust
pipeline's per-text work (normalizer, regex, BPE, Encoding objects: 30-50 us for a 90-character
text on these machines, this path about 10 us). It is taken only where it is exact:

- the tokenizer is one whose pipeline this module reproduces: a BPE model without dropout; no
  normalizer or a Unicode normal form (the identity on ASCII); pre-tokenizer ByteLevel with its
  regex, or Split(regex, isolated) then ByteLevel without regex; no prefix space; a post-processor
  that adds the same tokens to every text (found by probing it);
- the text is printable ASCII plus tab, newline and carriage return, where Python's ``regex`` and
  the tokenizer's Oniguruma agree on every character class;
- added tokens are split out first as the tokenizer does (those matched on the raw text, then the
  normalized ones, leftmost-longest); a text holding one with lstrip/rstrip/single_word goes whole
  to the tokenizer.

Every other text is encoded by the tokenizer itself (one batched call). Each instance checks its
first ``VERIFY_TEXTS`` fast-path texts against the tokenizer and turns itself off on any difference;
``DPO_FAST_BPE=0`` turns the path off altogether.
"""

from __future__ import annotations

import json
import logging
import os
import re
import weakref

import regex

log = logging.getLogger(__name__)

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
NORMAL_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}
POST_PROCESSORS = {"ByteLevel", "TemplateProcessing", "RobertaProcessing", "BertProcessing"}
VERIFY_TEXTS = 1024
MAX_ENTRIES = 500_000  # cached pre-tokens; the cache restarts empty beyond this (bounded memory)
_ASCII_CLASSES = {"L": "A-Za-z", "N": "0-9"}  # Unicode letters / numbers restricted to ASCII
_UNSAFE = re.compile(r"[^\t\n\r\x20-\x7e]")  # anything outside the characters the path handles

_instances: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map that ByteLevel applies before BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _normalizer_ok(spec) -> bool:
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_normalizer_ok(n) for n in spec.get("normalizers", []))
    return spec.get("type") in NORMAL_FORMS


def _pre_tokenizer_pattern(spec) -> str | None:
    """The one regex that splits text into pre-tokens, or None when the pre-tokenizer is another kind."""
    if spec is None:
        return None
    if spec.get("type") == "ByteLevel":
        ok = spec.get("use_regex", True) and not spec.get("add_prefix_space", False)
        return GPT2_PATTERN if ok else None
    if spec.get("type") != "Sequence" or len(spec.get("pretokenizers", [])) != 2:
        return None
    split, byte_level = spec["pretokenizers"]
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or "Regex" not in split.get("pattern", {})):
        return None
    if (byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True)
            or byte_level.get("add_prefix_space", False)):
        return None
    return split["pattern"]["Regex"]


def _post_processor_ok(spec) -> bool:
    if spec is None:
        return True
    if spec.get("type") == "Sequence":
        return all(_post_processor_ok(p) for p in spec.get("processors", []))
    return spec.get("type") in POST_PROCESSORS


def ascii_pattern(pattern: str) -> str | None:
    """``pattern`` for ASCII-only input in Python's ``re`` (twice as fast as ``regex`` here): ``\\p{L}``
    becomes A-Za-z and ``\\p{N}`` 0-9, inside or outside a character class; None if it uses another
    Unicode property."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            m = re.match(r"\\[pP]\{(\w+)\}", pattern[i:])
            if m:
                cls = _ASCII_CLASSES.get(m.group(1)) if m.group(0)[1] == "p" else None
                if cls is None:
                    return None
                out.append(cls if in_class else f"[{cls}]")
                i += m.end()
                continue
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def compile_split(pattern: str):
    """The pre-token regex: ``re`` on the ASCII translation where it compiles, else ``regex``."""
    ascii_form = ascii_pattern(pattern)
    if ascii_form is not None:
        try:
            return re.compile(ascii_form, re.ASCII)
        except re.error:
            pass
    return regex.compile(pattern)


def _literal_regex(words: list[str]):
    """Leftmost-longest matcher of literal strings (alternatives longest first)."""
    if not words:
        return None
    return re.compile("|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True)))


class FastBPE:
    """Pre-token cache for one fast tokenizer; build it with :func:`for_tokenizer`."""

    def __init__(self, backend, pattern: str, added: list[dict]):
        self.backend, self.model = backend, backend.model
        self.split = compile_split(pattern)
        self.chars = byte_chars()
        self.cache: dict[str, list[int]] = {}
        self.enabled, self.verified = True, 0
        ascii_added = [a for a in added if a["content"] and not _UNSAFE.search(a["content"])]
        plain = [a for a in ascii_added if not (a.get("lstrip") or a.get("rstrip") or a.get("single_word"))]
        self.added_ids = {a["content"]: a["id"] for a in plain}
        self.raw = _literal_regex([a["content"] for a in plain if not a.get("normalized", True)])
        self.normalized = _literal_regex([a["content"] for a in plain if a.get("normalized", True)])
        self.blocked = _literal_regex([a["content"] for a in ascii_added if a not in plain])
        self.affixes = {False: ([], [])}
        special = self._probe_affixes()
        if special is not None:
            self.affixes[True] = special

    def _probe_affixes(self):
        """(prefix, suffix) ids the post-processor adds to every single text, or None."""
        found = set()
        for text in ("a b", "Hello, world"):
            bare = self.backend.encode(text, add_special_tokens=False).ids
            full = self.backend.encode(text, add_special_tokens=True).ids
            for i in range(len(full) - len(bare) + 1):
                if full[i:i + len(bare)] == bare:
                    found.add((tuple(full[:i]), tuple(full[i + len(bare):])))
                    break
            else:
                return None
        if len(found) != 1:
            return None
        prefix, suffix = found.pop()
        return list(prefix), list(suffix)

    def _word_ids(self, piece: str) -> list[int]:
        chars = self.chars
        ids = [t.id for t in self.model.tokenize("".join([chars[b] for b in piece.encode()]))]
        if len(self.cache) >= MAX_ENTRIES:
            self.cache.clear()
        self.cache[piece] = ids
        return ids

    def _segments(self, text: str) -> list:
        """``text`` as a list of plain strings and added-token ids, split as the tokenizer splits."""
        parts: list = [text]
        for rx in (self.raw, self.normalized):
            if rx is None:
                continue
            out = []
            for part in parts:
                if isinstance(part, int) or rx.search(part) is None:
                    out.append(part)
                    continue
                pos = 0
                for m in rx.finditer(part):
                    if m.start() > pos:
                        out.append(part[pos:m.start()])
                    out.append(self.added_ids[m.group()])
                    pos = m.end()
                if pos < len(part):
                    out.append(part[pos:])
            parts = out
        return parts

    def _encode(self, text: str, prefix: list[int], suffix: list[int]) -> list[int] | None:
        """Ids of one text, or None when it must go to the tokenizer."""
        if _UNSAFE.search(text) or (self.blocked is not None and self.blocked.search(text)):
            return None
        ids = list(prefix)
        get, findall = self.cache.get, self.split.findall
        for seg in self._segments(text):
            if isinstance(seg, int):
                ids.append(seg)
                continue
            pieces = findall(seg)
            if sum(map(len, pieces)) != len(seg):  # the regex left characters out: not reproduced
                return None
            for piece in pieces:
                got = get(piece)
                ids += got if got is not None else self._word_ids(piece)
        ids += suffix
        return ids

    def encode_batch(self, texts: list[str], special: bool) -> list[list[int]]:
        """Ids of every text, identical to ``backend.encode_batch(texts, add_special_tokens=special)``."""
        run = getattr(self.backend, "encode_batch_fast", None) or self.backend.encode_batch
        if not self.enabled or special not in self.affixes:
            return [e.ids for e in run(texts, add_special_tokens=special)]
        prefix, suffix = self.affixes[special]
        out = [self._encode(t, prefix, suffix) for t in texts]
        rest = [i for i, ids in enumerate(out) if ids is None]
        if self.verified < VERIFY_TEXTS:
            check = [i for i, ids in enumerate(out) if ids is not None][:VERIFY_TEXTS - self.verified]
            truth = [e.ids for e in run([texts[i] for i in check], add_special_tokens=special)]
            if any(out[i] != ids for i, ids in zip(check, truth)):
                self.enabled = False
                log.warning("fast BPE path differs from the tokenizer on a text; using the tokenizer")
                return [e.ids for e in run(texts, add_special_tokens=special)]
            self.verified += len(check)
        if rest:
            for i, e in zip(rest, run([texts[i] for i in rest], add_special_tokens=special)):
                out[i] = e.ids
        return out  # type: ignore[return-value]


def build(backend) -> FastBPE | None:
    """A FastBPE for a ``tokenizers.Tokenizer`` whose pipeline it reproduces, else None."""
    if backend.truncation is not None or backend.padding is not None:
        return None
    if getattr(backend, "encode_special_tokens", False):
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
        return None
    if not _normalizer_ok(spec.get("normalizer")) or not _post_processor_ok(spec.get("post_processor")):
        return None
    pattern = _pre_tokenizer_pattern(spec.get("pre_tokenizer"))
    if pattern is None:
        return None
    try:
        return FastBPE(backend, pattern, spec.get("added_tokens") or [])
    except regex.error:
        return None


def _state(component) -> bytes | None:
    return None if component is None else component.__getstate__()


def _pipeline_key(backend) -> tuple:
    """What a tokenizer's owner may change after loading (added tokens, special-token handling,
    normalizer, pre-/post-processor): a changed key rebuilds the path (cheap to compute)."""
    return (id(backend), backend.get_vocab_size(with_added_tokens=True),
            repr(sorted(backend.get_added_tokens_decoder().items())),
            getattr(backend, "encode_special_tokens", False), backend.truncation, backend.padding,
            _state(backend.normalizer), _state(backend.pre_tokenizer), _state(backend.post_processor))


def for_tokenizer(tok) -> FastBPE | None:
    """The (cached) FastBPE of a transformers fast tokenizer, or None where the path does not apply."""
    if os.environ.get("DPO_FAST_BPE", "1") == "0" or not getattr(tok, "is_fast", False):
        return None
    backend = tok.backend_tokenizer
    key = _pipeline_key(backend)
    try:
        hit = _instances.get(tok)
    except TypeError:  # not weak-referenceable
        return build(backend)
    if hit is None or hit[0] != key:
        hit = (key, build(backend))
        _instances[tok] = hit
    return hit[1]
