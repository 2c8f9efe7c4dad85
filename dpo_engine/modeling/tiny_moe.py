"""The builtin mixture-of-experts model ``builtin:tiny-qwen3-moe``: a Qwen3-MoE small enough to train on a
CPU in a few minutes (4 layers, 8 experts of which 2 per token, hidden size 64, about 3.5M parameters,
most of them the tied embedding), randomly initialised from a fixed seed, with SmolLM2-135M-Instruct's
tokenizer and chat template. ``loading.builtin_tiny_moe`` builds it offline once into a safetensors folder
under the state home. It learns preferences (configs/moe-tiny.yaml), not language: it exists to run MoE
models, their routers and the router auxiliary loss through every stage."""

from __future__ import annotations

from torch import nn

TINY_MOE_VERSION = "1"
TINY_MOE_SEED = 0


def tiny_moe_model(tokenizer) -> nn.Module:
    """The randomly initialised model for ``tokenizer`` (seed the RNG first: ``loading.seeded``)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_intermediate_size=64,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, router_aux_loss_coef=0.001,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    return Qwen3MoeForCausalLM(cfg)
