"""The ``eval`` section: held-out generation and its judge."""

from __future__ import annotations

from pydantic import Field

from data_contracts.config.base import Section, Seed
from data_contracts.config.benchmarks import BenchmarksConfig


class EvalConfig(Section):
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch and pairs per batch of "
                            "the held-out preference metrics.")
    num_prompts: int = Field(32, ge=0, description="Held-out prompts to generate on (0: no generation).")
    max_new_tokens: int = Field(32, ge=1, description="Longest generated response, in tokens.")
    do_sample: bool = Field(False, description="Sample the responses (false: greedy decoding).")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature (do_sample only).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling share (do_sample only).")
    seed: Seed = Field(0, description="Seed of the generations and of the KL samples.")
    benchmarks: BenchmarksConfig = Field(default_factory=BenchmarksConfig, description="lm-evaluation-harness "
                                         "tasks run on the policy and on the reference (empty tasks: none).")
    judge: str | None = Field("data_contracts.builtin:judge", description="Pointwise: 'module:function' scoring "
                              "(prompt, response, row) -> float (higher is better), or "
                              "'reward_model:<folder or hub id>' (a sequence-classification reward "
                              "model). Pairwise: 'pairwise:module:function' returning P(response_a "
                              "better) in [0, 1] for (prompt, response_a, response_b, row), called in both "
                              "orders to cancel position bias, or 'pairwise:reward_model:<folder or hub id>' "
                              "(sigmoid of the score difference). Either gives the raw and the "
                              "length-controlled win-rate; null: no judge.")
