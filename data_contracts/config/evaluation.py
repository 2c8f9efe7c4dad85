"""The ``eval`` section: held-out generation and its judge."""

from __future__ import annotations

from pydantic import Field, field_validator, model_serializer

from data_contracts.config.base import Section, Seed
from data_contracts.config.benchmarks import BenchmarksConfig
from data_contracts.config.eval_sets import INHERIT, EvalSetConfig, check_sets


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
    sets: dict[str, EvalSetConfig] = Field(default_factory=dict, description="Named evaluation sets beside "
                                           "the default held-out split (whose metrics stay eval/...): name -> "
                                           "{source, prefix, judge, num_prompts, limit, max_new_tokens}; each "
                                           "is validated, precomputed and evaluated like the eval split, its "
                                           "metrics under its own prefix (default eval_<name>/).")

    @field_validator("sets")
    @classmethod
    def _sets(cls, v: dict[str, EvalSetConfig]) -> dict[str, EvalSetConfig]:
        return check_sets(v)

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        """No ``sets`` key while there are none: a config without named sets hashes (stage keys,
        registry.config_hash) and saves exactly as before the field existed."""
        out = handler(self)
        if isinstance(out, dict) and not out.get("sets"):
            out.pop("sets", None)
        return out

    def set_judge(self, name: str) -> str | None:
        """The judge spec of named set ``name`` (its own, or eval.judge when it inherits)."""
        judge = self.sets[name].judge
        return self.judge if judge == INHERIT else judge
