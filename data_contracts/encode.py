"""Tokenize one canonical Example into prompt / chosen / rejected token ids, then truncate.

Standard rows: prompt ids = ``tokenizer(prompt)`` (special tokens as the tokenizer adds them, a
doubled leading BOS collapsed); completion ids = ``tokenizer(text, add_special_tokens=False)`` + EOS
unless it already ends with EOS.

Conversational rows: the prompt is rendered with the chat template and ``add_generation_prompt=True``,
the full conversation (prompt + completion) without it; both are tokenized with
``add_special_tokens=False`` (the template already holds its special tokens). The prompt ids must be
a prefix of the full ids (else TEMPLATE_PREFIX_MISMATCH); completion = full[len(prompt):], cut after
its last EOS (ChatML puts "\\n" after <|im_end|>), or given one EOS when the template adds none. So
every untruncated completion ends with exactly one EOS, and no BOS/EOS is doubled.

Rows with images (``Example.images``, conversational): the prompt is rendered with its ``{"type":
"image"}`` parts as above, then tokenized again by the model's processor with the images, which
expands each image placeholder into the image's tokens (their number depends on the image for some
models); the completions are as above. ``Encoded.keep_from`` marks where the prompt's image tokens
(and the markers the template puts around them) begin: the position where the prompt rendered
without its image parts stops matching.

Truncation to max_length (prompt + longest completion): ``keep_start`` cuts the completions' ends;
``keep_end`` drops prompt tokens from the start (after a leading BOS), then cuts completions if still
too long. A prompt alone of max_length tokens or more is rejected (PROMPT_TOO_LONG), and a row whose
image tokens would be cut (the prompt does not fit, or keep_end would drop tokens past ``keep_from``)
as IMAGE_TOKENS_TRUNCATED.

:func:`encode_batch` does the same for a list of examples with one tokenizer call per kind of text
(a fast tokenizer encodes a list in Rust, in parallel): the ids are identical to row-by-row calls.
Chat templates are still rendered one row at a time (Jinja).
"""

from __future__ import annotations

from dataclasses import dataclass

from data_contracts import fast_bpe
from data_contracts.examples import Example, RowError
from data_contracts.images import VisionRows, image_truncation_error, without_image_parts


@dataclass
class Encoded:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    truncated: int = 0  # tokens removed by truncation
    keep_from: int | None = None  # rows with images: the first prompt position truncation must keep


def _ids(tok, text: str, special: bool) -> list[int]:
    return list(tok(text, add_special_tokens=special)["input_ids"])


def batch_ids(tok, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of many texts in one tokenizer call.

    A byte-level BPE tokenizer goes through :mod:`data_contracts.fast_bpe` (a pre-token cache, same
    ids, about 4x less CPU per text). Another fast tokenizer is called through its Rust backend (``encode_batch_fast``: no offsets, no
    BatchEncoding), which is what ``tok(texts)`` runs underneath, unless the backend carries its
    own truncation or padding settings; anything else goes through ``tok(texts)``.
    """
    if not texts:
        return []
    fast = fast_bpe.for_tokenizer(tok)
    if fast is not None:
        return fast.encode_batch(texts, special)
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is not None and backend.truncation is None and backend.padding is None:
        run = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return [e.ids for e in run(texts, add_special_tokens=special)]
    out = tok(texts, add_special_tokens=special, return_attention_mask=False,
              return_token_type_ids=False)["input_ids"]
    return [list(x) for x in out]


def _one_bos(ids: list[int], bos: int | None) -> list[int]:
    while bos is not None and len(ids) >= 2 and ids[0] == ids[1] == bos:
        ids = ids[1:]
    return ids


def _end_with_one_eos(ids: list[int], eos: int) -> list[int]:
    if not ids or ids[-1] != eos:
        ids = ids + [eos]
    while len(ids) >= 2 and ids[-2] == eos:
        ids = ids[:-1]
    return ids


def _cut_after_last_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:len(ids) - ids[::-1].index(eos)] if eos in ids else ids


def _render(tok, messages: list[dict], ex: Example, field: str, generation_prompt: bool,
            template_kwargs: dict | None = None) -> str:
    kwargs = {**(template_kwargs or {}), **(ex.template_kwargs or {})}
    if ex.tools:
        kwargs["tools"] = ex.tools
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                       tokenize=False, **kwargs)
    except Exception as e:  # a template may raise on roles it does not support
        raise RowError("TEMPLATE_ERROR", field, f"chat template failed: {str(e)[:200]}") from None
    if not isinstance(text, str):
        raise RowError("TEMPLATE_ERROR", field, "chat template did not render a string")
    return text


def _render_example(tok, ex: Example, template_kwargs: dict | None = None) -> list[str]:
    """[prompt with generation prompt, prompt + chosen, prompt + rejected] as text (RowError).
    ``template_kwargs``: data.chat_template_kwargs (the row's own override them)."""
    if not getattr(tok, "chat_template", None):
        raise RowError("NO_CHAT_TEMPLATE", "prompt", "conversational data needs a tokenizer with a "
                       "chat template; set model.chat_template_path")
    return [_render(tok, ex.prompt, ex, "prompt", True, template_kwargs),
            _render(tok, ex.prompt + ex.chosen, ex, "chosen", False, template_kwargs),
            _render(tok, ex.prompt + ex.rejected, ex, "rejected", False, template_kwargs)]


def _from_rendered(ids: list[list[int]], bos: int | None, eos: int) -> Encoded:
    prompt = _one_bos(ids[0], bos)
    sides = []
    for field, full in (("chosen", ids[1]), ("rejected", ids[2])):
        full = _one_bos(full, bos)
        if full[:len(prompt)] != prompt:
            raise RowError("TEMPLATE_PREFIX_MISMATCH", field, "chat template renders the prompt "
                           "differently once the completion follows; prompt ids are not a prefix")
        out = _cut_after_last_eos(full[len(prompt):], eos)
        if not out or out == [eos]:
            raise RowError("EMPTY_COMPLETION", field, f"'{field}' has no tokens after templating")
        sides.append(_end_with_one_eos(out, eos))
    return Encoded(prompt, *sides)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _expand_images(out: list, examples: list[Example], owners: list[int], texts: list[str], tok,
                   vision: VisionRows | None, template_kwargs: dict | None) -> None:
    """The prompts of the encoded rows with images, expanded by the processor (see the module
    docstring), in place in ``out``."""
    todo = [(k, i) for k, i in enumerate(owners) if examples[i].images and isinstance(out[i], Encoded)]
    if not todo:
        return
    bos = tok.bos_token_id
    plain = []
    for k, i in todo:
        ex = examples[i]
        try:
            plain.append(_render(tok, without_image_parts(ex.prompt), ex, "prompt", True, template_kwargs))
        except RowError:
            plain.append("")
    plain_ids = batch_ids(tok, plain, False)
    for (k, i), before in zip(todo, plain_ids):
        enc = out[i]
        try:
            if vision is None:
                raise RowError("IMAGE_NEEDS_VISION_MODEL", "images", "the row has images but no processor was given")
            keep_from = _common_prefix(enc.prompt, _one_bos(before, bos))
            expanded = _one_bos(vision.expanded_prompt(texts[3 * k], examples[i].images), bos)
            if expanded[:keep_from] != enc.prompt[:keep_from] or len(expanded) < len(enc.prompt):
                raise RowError("IMAGE_TOKENS_MISMATCH", "prompt", "the processor tokenizes the prompt differently "
                               "from the tokenizer outside the image tokens")
            out[i] = Encoded(expanded, enc.chosen, enc.rejected, keep_from=keep_from)
        except RowError as e:
            out[i] = e


def encode_batch(examples: list[Example], tok, max_length: int | None = None,
                 mode: str = "keep_start", template_kwargs: dict | None = None,
                 vision: VisionRows | None = None) -> list[Encoded | RowError]:
    """Tokenize (and, given max_length, truncate) many examples: an Encoded or a RowError each.
    ``template_kwargs``: extra chat template variables for conversational rows; ``vision``: the
    processor that expands the image placeholders of rows with images."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    out: list[Encoded | RowError | None] = [None] * len(examples)
    std = [i for i, ex in enumerate(examples) if not ex.is_conversational]
    if std:
        prompts = batch_ids(tok, [examples[i].prompt for i in std], True)
        comps = batch_ids(tok, [examples[i].chosen for i in std] + [examples[i].rejected for i in std],
                          False)
        n = len(std)
        for k, i in enumerate(std):
            out[i] = Encoded(_one_bos(prompts[k], bos), _end_with_one_eos(comps[k], eos),
                             _end_with_one_eos(comps[n + k], eos))
    texts, owners = [], []
    for i, ex in enumerate(examples):
        if ex.is_conversational:
            try:
                texts += _render_example(tok, ex, template_kwargs)
                owners.append(i)
            except RowError as e:
                out[i] = e
    ids = batch_ids(tok, texts, False)
    for k, i in enumerate(owners):
        try:
            out[i] = _from_rendered(ids[3 * k:3 * k + 3], bos, eos)
        except RowError as e:
            out[i] = e
    _expand_images(out, examples, owners, texts, tok, vision, template_kwargs)
    if max_length is not None:
        for i, enc in enumerate(out):
            if isinstance(enc, Encoded):
                try:
                    out[i] = truncate(enc, max_length, mode, bos)
                except RowError as e:
                    out[i] = e
    return out  # type: ignore[return-value]


def encode_example(ex: Example, tok) -> Encoded:
    """Token ids of one example, before truncation (raises RowError)."""
    (enc,) = encode_batch([ex], tok)
    if isinstance(enc, RowError):
        raise enc
    return enc


def truncate(enc: Encoded, max_length: int, mode: str, bos: int | None) -> Encoded:
    p, c, r = enc.prompt, enc.chosen, enc.rejected
    if enc.keep_from is not None and len(p) >= max_length:
        raise image_truncation_error(len(p), enc.keep_from, max_length, 0)
    if len(p) >= max_length:
        raise RowError("PROMPT_TOO_LONG", "prompt", f"prompt has {len(p)} tokens, max_length is "
                       f"{max_length}; raise data.max_length or shorten the prompt")
    before = len(p) + len(c) + len(r)
    over = len(p) + max(len(c), len(r)) - max_length
    if over > 0 and mode == "keep_end":
        head = 1 if bos is not None and p and p[0] == bos else 0
        drop = max(0, min(over, len(p) - head - 1))  # keep a BOS and at least one prompt token
        if enc.keep_from is not None and drop and (err := image_truncation_error(
                len(p), enc.keep_from, max_length, head + drop)) is not None:
            raise err
        p = p[:head] + p[head + drop:]
        over -= drop
    if over > 0:
        budget = max_length - len(p)
        c, r = c[:budget], r[:budget]
    return Encoded(p, c, r, before - len(p) - len(c) - len(r))


def encode(ex: Example, tok, max_length: int, mode: str = "keep_start") -> Encoded:
    """Tokenize and truncate one example (raises RowError)."""
    return truncate(encode_example(ex, tok), max_length, mode, tok.bos_token_id)
