"""Chat template control: an EOS override checked against the template's end of an assistant turn.

Why: training teaches the model to stop where the completion ids end, and encoding ends every
completion with the tokenizer's EOS. If the chat template closes an assistant turn with another token
(a Qwen *base* tokenizer has EOS ``<|endoftext|>`` while ChatML closes turns with ``<|im_end|>``),
the model learns to emit ``<|im_end|><|endoftext|>``, and generation, which stops at EOS or at the
template's marker depending on the server, goes wrong. ``model.eos_token`` sets the EOS; the check
renders a one-turn conversation and requires that EOS right after the assistant's text.
"""

from __future__ import annotations

import warnings

from data_contracts.config import ConfigError

PROBE_USER = "Hello?"
PROBE_ASSISTANT = "Probe reply 42."


def _render_one_turn(tok) -> str:
    convo = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_ASSISTANT}]
    try:
        return tok.apply_chat_template(convo, tokenize=False)
    except Exception:  # some templates insist on a system message first
        system = [{"role": "system", "content": "You are helpful."}]
        return tok.apply_chat_template(system + convo, tokenize=False)


def turn_end_problem(tok, eos_token: str | None = None) -> str | None:
    """Why the chat template does not end an assistant turn with ``eos_token`` (default: the
    tokenizer's), or None when it does (or there is no chat template to check)."""
    if not getattr(tok, "chat_template", None):
        return None
    eos = eos_token or tok.eos_token
    if not eos:
        return "the tokenizer has no eos_token"
    try:
        text = _render_one_turn(tok)
    except Exception as e:
        return f"the chat template cannot render a one-turn conversation ({str(e)[:160]})"
    at = text.rfind(PROBE_ASSISTANT)
    if at < 0:
        return "the chat template drops the assistant's text of a one-turn conversation"
    tail = text[at + len(PROBE_ASSISTANT):]
    if tail.lstrip().startswith(eos):
        return None
    shown = tail.strip()[:40] or "nothing"
    return (f"the chat template ends an assistant turn with {shown!r}, not with eos_token {eos!r}; "
            f"set model.eos_token to the template's end-of-turn token (e.g. '<|im_end|>' for "
            f"Qwen/ChatML templates) or give a matching model.chat_template_path")


def configure_eos(tok, eos_token: str | None) -> None:
    """Apply ``model.eos_token`` to a loaded tokenizer and check it against the chat template.

    With an override: it must be a single token (ConfigError otherwise), becomes ``tok.eos_token``,
    and a template that does not end assistant turns with it is a ConfigError. Without one, a
    mismatch between the tokenizer's EOS and the template only warns.
    """
    if eos_token:
        tok.eos_token = eos_token
        tid = tok.eos_token_id
        ids = tok(eos_token, add_special_tokens=False)["input_ids"]
        unk = getattr(tok, "unk_token_id", None)
        if tid is None or (tid == unk and eos_token != getattr(tok, "unk_token", None)) or ids != [tid]:
            raise ConfigError(f"config error: model.eos_token={eos_token!r} is not a single token of "
                              f"the tokenizer (it encodes to {ids[:8]}); use a token of its vocabulary")
    problem = turn_end_problem(tok)
    if problem is None:
        return
    if eos_token:
        raise ConfigError(f"config error: model.eos_token: {problem}")
    warnings.warn(f"tokenizer: {problem}", UserWarning, stacklevel=2)
