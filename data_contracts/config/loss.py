"""The ``loss`` section and the loss-type tables its validators check against."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from data_contracts.config.base import Section

# Loss names (TRL's ``loss_type`` values plus the reference-free SimPO and ORPO) and the facts the
# validators need. The formulas live in ``dpo_engine.modeling.losses``.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo", "orpo")
SMOOTHED_LOSSES = frozenset({"sigmoid", "exo_pair", "robust", "aot", "aot_unpaired", "simpo"})  # read eps
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                                 "discopop", "sft"})  # built on s_c - s_r (TRL rejects the others)
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo"})


class LossConfig(Section):
    loss_type: str | list[str] = Field("sigmoid", description="One loss or a list combined with "
                                       "loss_weights: " + ", ".join(LOSS_TYPES) + ".")
    loss_weights: list[float] | None = Field(None, description="One weight per loss type (default all "
                                             "1.0); total = sum_k w_k * mean(loss_k). MPO: [0.8, 0.2, 1.0].")
    beta: float = Field(0.1, gt=0.0, description="Strength of the pull towards the reference (TRL's "
                        "beta): higher keeps the policy closer to it; IPO's tau.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="eps: cDPO for sigmoid/aot/simpo, "
                                   "flip rate for robust (< 0.5), EXO's eps for exo_pair (> 0, 1e-3).")
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = Field(
        "reverse_kl", description="f-DPO divergence between policy and reference (reverse_kl: standard "
        "DPO); only for losses built on the chosen-rejected difference.")
    f_alpha_divergence_coef: float = Field(0.5, ge=0.0, le=1.0, description="alpha of alpha_divergence "
                                           "(0: forward_kl, 1: reverse_kl).")
    discopop_tau: float = Field(0.05, gt=0.0, description="DiscoPOP's temperature tau (loss_type "
                                "discopop).")
    use_weighting: bool = Field(False, description="WPO: each pair's loss times w_c * w_r.")
    ld_alpha: float | None = Field(None, ge=0.0, le=1.0, description="LD-DPO: weight of the tokens past "
                                   "min(Lc, Lr); null: off.")
    simpo_gamma: float = Field(0.5, ge=0.0, description="SimPO target margin gamma.")
    orpo_lambda: float = Field(0.1, ge=0.0, description="ORPO weight of the odds-ratio term.")

    @field_validator("loss_type", mode="before")
    @classmethod
    def _known_types(cls, v: Any) -> Any:
        names = [v] if isinstance(v, str) else v
        if isinstance(names, list):
            if not names:
                raise ValueError("needs at least one loss type")
            for n in names:
                if isinstance(n, str) and n not in LOSS_TYPES:
                    raise ValueError(f"unknown loss type {n!r}; choose from {', '.join(LOSS_TYPES)}")
            if len(set(names)) != len(names):
                raise ValueError("lists a loss type twice")
        return v

    @field_validator("loss_weights")
    @classmethod
    def _finite_weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(not (w >= 0.0 and w < float("inf")) for w in v):
            raise ValueError("weights must be finite and >= 0")
        return v

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def weights(self) -> list[float]:
        return list(self.loss_weights) if self.loss_weights is not None else [1.0] * len(self.loss_types)

    @model_validator(mode="after")
    def _combinations(self) -> "LossConfig":
        types, eps = self.loss_types, self.label_smoothing
        named = "loss_type=" + "+".join(types)
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"loss.loss_weights has {len(self.loss_weights)} entries but loss.loss_type "
                             f"has {len(types)}")
        smoothed = [t for t in types if t in SMOOTHED_LOSSES]
        if eps and not smoothed:
            raise ValueError(f"loss.label_smoothing has no effect with {named}; set it to 0")
        if "exo_pair" in types and eps == 0:
            raise ValueError("loss.label_smoothing must be > 0 with loss_type=exo_pair (1e-3 recommended)")
        if eps >= 0.5 and any(t != "exo_pair" for t in smoothed):
            raise ValueError(f"loss.label_smoothing must be < 0.5 with {named} (a flip rate of 0.5 or more "
                             "reverses the preferences)")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(types):
            raise ValueError(f"loss.use_weighting is not supported with {named} (aot sorts the batch)")
        if self.f_divergence_type != "reverse_kl":
            bad = [t for t in types if t not in F_DIVERGENCE_LOSSES]
            if bad:
                raise ValueError(f"loss.f_divergence_type={self.f_divergence_type} does not apply to "
                                 f"{', '.join(bad)}; only to {', '.join(sorted(F_DIVERGENCE_LOSSES))}")
        return self
