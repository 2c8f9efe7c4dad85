"""Tiny mixture-of-experts causal LMs of three architectures transformers ships, built in the tests from
a config (randomly initialised, no files from a hub), with the character-level test tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny import tiny_tokenizer

ARCHS = ("qwen3_moe", "mixtral", "olmoe")


def tiny_moe(arch: str, seed: int = 0, vocab: int | None = None, experts: int = 4, top_k: int = 2,
             coef: float = 0.02):
    """A 2-layer MoE model of ``arch`` (hidden 32, ``experts`` experts, ``top_k`` per token) whose
    config's router_aux_loss_coef is ``coef``."""
    import transformers

    tok = tiny_tokenizer()
    common = dict(vocab_size=vocab or len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  num_experts_per_tok=top_k, router_aux_loss_coef=coef, tie_word_embeddings=True,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    if arch == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, num_experts=experts, moe_intermediate_size=16, head_dim=8)
        cls = transformers.Qwen3MoeForCausalLM
    elif arch == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=experts)
        cls = transformers.MixtralForCausalLM
    elif arch == "olmoe":
        cfg = transformers.OlmoeConfig(**common, num_experts=experts)
        cls = transformers.OlmoeForCausalLM
    else:
        raise ValueError(f"unknown tiny MoE architecture {arch!r}; known: {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    return cls(cfg)


def tiny_moe_dir(path: Path, arch: str = "qwen3_moe", seed: int = 0, **kw) -> Path:
    """``tiny_moe`` saved with its tokenizer as a normal HF folder."""
    tiny_moe(arch, seed, **kw).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save_pretrained(path)
    return path
