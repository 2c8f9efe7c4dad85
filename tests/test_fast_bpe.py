"""The fast byte-level BPE path gives exactly the tokenizer's ids, and is taken only where it can."""

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from data_contracts import fast_bpe
from data_contracts.encode import batch_ids
from tiny import tiny_tokenizer

NEOX = Path(__file__).resolve().parents[2] / "shared" / "models" / "gpt-neox-20b-tokenizer" / "tokenizer.json"
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WORDS = ("the a of and to in is was that it for on with as he at by had from they this but were story "
         "time once upon there little girl boy dog cat tree house don't I'll we're it's DON'T HE'S "
         "answer: 42 3.14 1999 x=y+1; print(\"hi\") def f(): return [1, 2]").split(" ")
PIECES = WORDS + [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "'s", "'S", "'ll", "'", "!", "?!", "...",
                  "é", "你好", "\u00a0", "\u2028", "\x1c", "\x00", "🙂", "ﬁ", "<|im_start|>", "<|im_end|>",
                  "<mask>", "<raw>", "<|endoftext|>", "<|padding|>", "12345", "0x1F"]
PROPS = settings(derandomize=True, max_examples=150, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])
texts_strategy = st.lists(st.one_of(st.lists(st.sampled_from(PIECES), max_size=30).map("".join),
                                    st.text(max_size=40)), min_size=1, max_size=8)


def _corpus(n=3000, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n)]


def _trained(pre_tokenizer, post_processor=None, normalizer=None) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tokenizer
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<bos>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_tokens([AddedToken("<mask>", lstrip=True), AddedToken("<raw>", normalized=False),
                   AddedToken("  ", normalized=True)])
    if post_processor is not None:
        tk.post_processor = post_processor
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<|im_end|>")


def gpt2_style():
    """ByteLevel with its regex, NFC, a post-processor that adds BOS, and awkward added tokens."""
    bos = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 0)])
    return _trained(pre_tokenizers.ByteLevel(add_prefix_space=False), bos, normalizers.NFC())


def qwen_style():
    """Split(Qwen's regex, isolated) then ByteLevel without regex."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return _trained(pre, processors.ByteLevel(trim_offsets=False))


def neox():
    if not NEOX.is_file():
        pytest.skip(f"{NEOX} not present (../shared)")
    return PreTrainedTokenizerFast(tokenizer_file=str(NEOX), eos_token="<|endoftext|>")


def _rust(tok, texts, special):
    return [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=special)]


@pytest.fixture(scope="module", params=["gpt2_style", "qwen_style", "neox"])
def tok(request):
    return globals()[request.param]()


@PROPS
@given(texts=texts_strategy, special=st.booleans())
def test_same_ids_as_the_tokenizer(tok, texts, special):
    fast = fast_bpe.for_tokenizer(tok)
    assert fast is not None
    fast.verified = fast_bpe.VERIFY_TEXTS  # no self-check: the comparison here is the check
    assert fast.encode_batch(texts, special) == _rust(tok, texts, special)
    assert fast.enabled


def test_natural_text_is_mostly_on_the_fast_path(tok):
    texts = _corpus(500, seed=7)
    fast = fast_bpe.for_tokenizer(tok)
    assert all(fast._encode(t, [], []) is not None for t in texts)
    assert batch_ids(tok, texts, False) == _rust(tok, texts, False)
    assert batch_ids(tok, texts, True) == _rust(tok, texts, True)


def test_added_tokens_split_like_the_tokenizer():
    tok = gpt2_style()
    text = "a<|im_start|>user\nhi<|im_end|>\n<raw>x  y"
    fast = fast_bpe.for_tokenizer(tok)
    assert fast._encode(text, [], []) == _rust(tok, [text], False)[0]
    assert fast._encode("a <mask> b", [], []) is None  # lstrip token: left to the tokenizer
    assert fast.affixes[True] == ([tok.convert_tokens_to_ids("<bos>")], [])


def test_patterns_translate_for_ascii_only():
    assert fast_bpe.ascii_pattern(r" ?\p{L}+|[^\s\p{L}\p{N}]") == r" ?[A-Za-z]+|[^\sA-Za-z0-9]"
    assert fast_bpe.ascii_pattern(r"[\p{Lu}]+") is None
    assert fast_bpe.ascii_pattern(r"\P{L}") is None


def test_a_difference_turns_the_path_off(tok):
    fast = fast_bpe.build(tok.backend_tokenizer)
    texts = _corpus(50, seed=3)
    fast.cache["the"] = [0]  # poisoned: the verification must catch it
    fast.cache[" the"] = [0]
    assert fast.encode_batch(texts, False) == _rust(tok, texts, False)
    assert not fast.enabled
    assert fast.encode_batch(texts, False) == _rust(tok, texts, False)


def test_cache_is_bounded(tok, monkeypatch):
    monkeypatch.setattr(fast_bpe, "MAX_ENTRIES", 5)
    fast = fast_bpe.build(tok.backend_tokenizer)
    texts = _corpus(200, seed=5)
    assert fast.encode_batch(texts, False) == _rust(tok, texts, False)
    assert len(fast.cache) <= 5


def test_not_taken_where_it_would_not_be_exact(monkeypatch):
    assert fast_bpe.for_tokenizer(tiny_tokenizer()) is None  # WordLevel model
    prefix_space = _trained(pre_tokenizers.ByteLevel(add_prefix_space=True))
    assert fast_bpe.for_tokenizer(prefix_space) is None
    lower = _trained(pre_tokenizers.ByteLevel(add_prefix_space=False), normalizer=normalizers.Lowercase())
    assert fast_bpe.for_tokenizer(lower) is None
    tok = gpt2_style()
    tok.backend_tokenizer.enable_truncation(8)
    assert fast_bpe.for_tokenizer(tok) is None
    monkeypatch.setenv("DPO_FAST_BPE", "0")
    assert fast_bpe.for_tokenizer(gpt2_style()) is None


def test_rebuilt_when_the_tokenizer_changes():
    tok = qwen_style()
    first = fast_bpe.for_tokenizer(tok)
    assert fast_bpe.for_tokenizer(tok) is first
    tok.add_special_tokens({"additional_special_tokens": ["the"]})  # an existing word becomes special
    again = fast_bpe.for_tokenizer(tok)
    assert again is not first
    text = "the cat and the dog"
    assert again.encode_batch([text], False) == _rust(tok, [text], False)
    assert tok.convert_tokens_to_ids("the") in again.encode_batch([text], False)[0]
