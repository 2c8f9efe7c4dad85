"""Preference losses from per-sequence log-probs, and the metrics TRL users know.

One mechanism: :func:`dpo_loss` builds a :class:`LossInputs` once per micro-batch (log-ratios,
f-divergence scores, lengths, the batch SFT term), then every loss in ``loss_type`` is a few lines in
the ``LOSSES`` registry reading what it needs from it. Formulas and names follow TRL (see
docs/ANCHORS.md §1).

Notation: a sequence log-prob is the SUM of completion-token log-probs. c = policy_chosen -
ref_chosen, r = policy_rejected - ref_rejected (raw log-ratios); s_c = f(c), s_r = f(r) are the
f-divergence scores (f = identity for reverse_kl) and delta = s_c - s_r; Lc, Lr are completion token
counts (clamped >= 1); beta = loss.beta; eps = loss.label_smoothing. Losses that read c and r (RAW)
ignore the f-divergence; the config refuses a non-default f-divergence with them.

Inputs the caller computes (per pair, from per-token tensors of the fused head):

* LD-DPO (``ld_alpha``): pass log-probs already weighted by :func:`ld_weighted_logps`, for the policy
  AND the reference (the precomputed reference must be weighted the same way, pair by pair).
  ``sft_chosen_logps`` then takes the unweighted chosen sums (the SFT/ORPO NLL uses every token).
* WPO (``use_weighting``): pass ``chosen_log_weight`` / ``rejected_log_weight``, the log of each
  sequence's WPO weight, from :func:`wpo_log_weight`: mean over completion tokens of
  ``logp(token) - log sum_v p(v)^2``, where ``log sum_v p(v)^2 = logsumexp(2 z) - 2 logsumexp(z)``
  for the logits z of that position. They are detached here (no gradient flows through weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from data_contracts.config import LOSS_TYPES, REFERENCE_FREE_LOSSES, LossConfig

Tensor = torch.Tensor


@dataclass
class PairLoss:
    losses: Tensor  # [B] per-pair loss (weighted sum over loss types; its batch mean is the loss)
    chosen_rewards: Tensor  # [B] beta * c (beta * Lc-mean log-prob for simpo/orpo), detached
    rejected_rewards: Tensor  # [B] beta * r (beta * Lr-mean log-prob for simpo/orpo), detached


def ld_weighted_logps(token_logps_c: Tensor, token_logps_r: Tensor, mask_c: Tensor, mask_r: Tensor,
                      alpha: float) -> tuple[Tensor, Tensor]:
    """LD-DPO sequence log-probs of a batch of pairs: the first min(Lc, Lr) completion tokens of each
    side count fully, the later ("verbose") ones with weight ``alpha``.

    ``token_logps_*`` are [B, T] per-token log-probs and ``mask_*`` [B, T] completion masks (prompt
    and padding positions 0; any padding side; chosen and rejected may have different T). Returns
    two [B] tensors. ``alpha=1`` gives the plain sums, ``alpha=0`` truncates to the shared length.
    """
    mc, mr = mask_c.bool(), mask_r.bool()
    shared = torch.minimum(mc.sum(-1), mr.sum(-1)).unsqueeze(-1)

    def weighted(logps: Tensor, mask: Tensor) -> Tensor:
        rank = mask.cumsum(-1)  # 1-based index of each completion token
        w = torch.where(rank <= shared, 1.0, alpha).to(logps.dtype)
        return torch.where(mask, logps * w, torch.zeros_like(logps)).sum(-1)

    return weighted(token_logps_c, mc), weighted(token_logps_r, mr)


@torch.no_grad()
def wpo_log_weight(token_logps: Tensor, token_log_sum_p2: Tensor, mask: Tensor) -> Tensor:
    """log of the WPO weight of each sequence: mean over completion tokens of
    ``logp(token) - log sum_v p(v)^2``. All inputs [N, T]; returns [N] (no gradient)."""
    m = mask.bool()
    terms = torch.where(m, token_logps - token_log_sum_p2, torch.zeros_like(token_logps))
    return terms.sum(-1) / m.sum(-1).clamp(min=1)


def f_divergence(x: Tensor, kind: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    """TRL's f-divergence score of a log-ratio. forward_kl is alpha_divergence at alpha=0 (same
    clamp of (alpha-1)x: 80 in fp32/bf16/fp64, 11 in fp16); alpha=1 is reverse_kl."""
    if kind == "reverse_kl":
        return x
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(x)
    if kind == "forward_kl":
        alpha = 0.0
    elif kind != "alpha_divergence":
        raise ValueError(f"unknown f_divergence_type {kind!r}")
    if alpha == 1.0:
        return x
    cap = 11.0 if x.dtype == torch.float16 else 80.0
    return torch.expm1(((alpha - 1) * x).clamp(max=cap)) / (alpha - 1)


class LossInputs:
    """Everything a loss may read; a missing optional input raises a message naming the loss."""

    def __init__(self, *, beta: float, eps: float, policy_chosen: Tensor, policy_rejected: Tensor,
                 ref_chosen: Tensor | None, ref_rejected: Tensor | None, chosen_len: Tensor | None,
                 rejected_len: Tensor | None, sft_chosen_logps: Tensor, f_type: str, f_alpha: float,
                 discopop_tau: float, simpo_gamma: float, orpo_lambda: float,
                 sft_tokens_per_pair: float | None = None):
        self.beta, self.eps = beta, eps
        self._sft_tpp = sft_tokens_per_pair
        self.pc, self.pr = policy_chosen, policy_rejected
        self.tau, self.gamma, self.lam = discopop_tau, simpo_gamma, orpo_lambda
        self._ref = None if ref_chosen is None or ref_rejected is None else \
            (ref_chosen.to(policy_chosen), ref_rejected.to(policy_rejected))
        self._lens = None if chosen_len is None or rejected_len is None else \
            (chosen_len.to(policy_chosen), rejected_len.to(policy_rejected))
        self._sft_logps = sft_chosen_logps
        self._f = (f_type, f_alpha)
        self.current = ""  # the loss being computed, for error messages

    def _missing(self, what: str) -> ValueError:
        return ValueError(f"loss_type={self.current} needs {what}")

    @property
    def ref(self) -> tuple[Tensor, Tensor]:
        if self._ref is None:
            raise self._missing("reference log-probs (ref_chosen, ref_rejected)")
        return self._ref

    @cached_property
    def c(self) -> Tensor:
        return self.pc - self.ref[0]

    @cached_property
    def r(self) -> Tensor:
        return self.pr - self.ref[1]

    @cached_property
    def sc(self) -> Tensor:
        return f_divergence(self.c, *self._f)

    @cached_property
    def sr(self) -> Tensor:
        return f_divergence(self.r, *self._f)

    @cached_property
    def delta(self) -> Tensor:
        return self.sc - self.sr

    @cached_property
    def lc(self) -> Tensor:
        return self._lengths()[0].clamp(min=1)

    @cached_property
    def lr(self) -> Tensor:
        return self._lengths()[1].clamp(min=1)

    def _lengths(self) -> tuple[Tensor, Tensor]:
        if self._lens is None:
            raise self._missing("completion token counts (chosen_len, rejected_len)")
        return self._lens

    @cached_property
    def sft(self) -> Tensor:
        """Token-mean NLL over the chosen completion tokens of the micro-batch, replicated per pair
        (a batch-level term: its batch mean is itself, so it combines with the weights like the rest).
        Under gradient accumulation the mean must run over the whole step's tokens, not each
        micro-batch's: ``sft_tokens_per_pair`` (the step's chosen tokens / its pairs) then replaces
        this micro-batch's own count per pair, so the step's per-pair mean is the step's token mean."""
        b = self.pc.shape[0]
        tokens = self._lengths()[0].sum().clamp(min=1) if self._sft_tpp is None else \
            torch.tensor(max(self._sft_tpp * b, 1e-12), dtype=self.pc.dtype, device=self.pc.device)
        return (-self._sft_logps.sum() / tokens).expand(b)


def smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    """-(1-eps) log sigma(z) - eps log sigma(-z): the cDPO / aot form (plain -log sigma(z) at eps=0)."""
    loss = -F.logsigmoid(z)
    return loss if not eps else (1 - eps) * loss - eps * F.logsigmoid(-z)


def _sorted(x: Tensor) -> Tensor:
    return torch.sort(x, dim=0).values


def _log_odds(avg_logp: Tensor) -> Tensor:
    """log(p / (1 - p)) from a mean token log-prob log p (p < 1 kept by a tiny clamp)."""
    avg_logp = avg_logp.clamp(max=-1e-6)
    return avg_logp - torch.log(-torch.expm1(avg_logp))


LOSSES: dict[str, Callable[[LossInputs], Tensor]] = {}


def register_loss(name: str):
    """Register ``fn(x: LossInputs) -> [B] per-pair loss`` under a ``loss_type`` name."""
    def register(fn):
        LOSSES[name] = fn
        return fn
    return register


@register_loss("sigmoid")
def _sigmoid(x):  # eps > 0: conservative DPO (cDPO), TRL <= 0.27
    return smoothed_sigmoid(x.beta * x.delta, x.eps)


@register_loss("hinge")
def _hinge(x):
    return torch.relu(1 - x.beta * x.delta)


@register_loss("ipo")
def _ipo(x):
    return (x.sc / x.lc - x.sr / x.lr - 1 / (2 * x.beta)) ** 2


@register_loss("exo_pair")
def _exo_pair(x):
    z = x.beta * x.delta
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - x.eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(x.eps)))


@register_loss("nca_pair")
def _nca_pair(x):  # RAW
    return -F.logsigmoid(x.beta * x.c) - 0.5 * F.logsigmoid(-x.beta * x.c) - 0.5 * F.logsigmoid(-x.beta * x.r)


@register_loss("robust")
def _robust(x):
    z = x.beta * x.delta
    return (-(1 - x.eps) * F.logsigmoid(z) + x.eps * F.logsigmoid(-z)) / (1 - 2 * x.eps)


@register_loss("bco_pair")
def _bco_pair(x):  # RAW
    return -F.logsigmoid(x.beta * x.c) - F.logsigmoid(-x.beta * x.r)


@register_loss("sppo_hard")
def _sppo_hard(x):  # RAW
    return (x.c - 1 / (2 * x.beta)) ** 2 + (x.r + 1 / (2 * x.beta)) ** 2


@register_loss("aot")
def _aot(x):  # RAW; sorted over the micro-batch, so loss i is no longer pair i's
    ref_c, ref_r = x.ref
    return smoothed_sigmoid(x.beta * (_sorted(x.pc - x.pr) - _sorted(ref_c - ref_r)), x.eps)


@register_loss("aot_unpaired")
def _aot_unpaired(x):  # RAW
    return smoothed_sigmoid(x.beta * (_sorted(x.c) - _sorted(x.r)), x.eps)


@register_loss("apo_zero")
def _apo_zero(x):  # RAW
    return (1 - torch.sigmoid(x.beta * x.c)) + torch.sigmoid(x.beta * x.r)


@register_loss("apo_down")
def _apo_down(x):  # RAW
    return torch.sigmoid(x.beta * x.c) + (1 - torch.sigmoid(x.beta * (x.c - x.r)))


@register_loss("discopop")
def _discopop(x):
    z = x.beta * x.delta
    m = torch.sigmoid(z / x.tau)
    return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)


@register_loss("sft")
def _sft(x):
    return x.sft


@register_loss("sigmoid_norm")
def _sigmoid_norm(x):
    return -F.logsigmoid(x.beta * (x.sc / x.lc - x.sr / x.lr))


@register_loss("simpo")
def _simpo(x):  # reference-free: length-normalised log-probs, target margin gamma
    return smoothed_sigmoid(x.beta * (x.pc / x.lc - x.pr / x.lr) - x.gamma, x.eps)


@register_loss("orpo")
def _orpo(x):  # reference-free: chosen NLL + lambda * odds-ratio term
    return x.sft - x.lam * F.logsigmoid(_log_odds(x.pc / x.lc) - _log_odds(x.pr / x.lr))


assert set(LOSSES) == set(LOSS_TYPES), "LOSSES and data_contracts.config.LOSS_TYPES disagree"


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor,
             ref_chosen: Tensor | None = None, ref_rejected: Tensor | None = None, *,
             loss_type: str | Sequence[str] = "sigmoid", loss_weights: Sequence[float] | None = None,
             beta: float = 0.1, label_smoothing: float = 0.0,
             chosen_len: Tensor | None = None, rejected_len: Tensor | None = None,
             f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
             discopop_tau: float = 0.05, simpo_gamma: float = 0.5, orpo_lambda: float = 0.1,
             use_weighting: bool = False, chosen_log_weight: Tensor | None = None,
             rejected_log_weight: Tensor | None = None,
             sft_chosen_logps: Tensor | None = None, sft_tokens_per_pair: float | None = None) -> PairLoss:
    """Per-pair losses and rewards of one micro-batch from [B] per-sequence log-prob sums.

    ``losses[i] = (sum_k w_k * loss_k[i]) * (w_c[i] * w_r[i] if use_weighting)``, so
    ``losses.mean()`` is TRL's total ``sum_k w_k * mean(loss_k)``. Needs ``chosen_len`` and
    ``rejected_len`` for ipo, sigmoid_norm, sft, simpo and orpo; reference log-probs for all but
    simpo and orpo. ``sft_chosen_logps`` (default ``policy_chosen``) is what sft/orpo's NLL sums;
    ``sft_tokens_per_pair`` (default: this batch's) normalises it (see ``LossInputs.sft``).
    Rewards are beta * c and beta * r, or for a reference-free first loss beta * log-prob / length.
    Validation of option combinations is :class:`LossConfig`'s job; here only missing inputs fail.
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types")
    unknown = [t for t in types if t not in LOSSES]
    if unknown or not types:
        raise ValueError(f"unknown loss_type {unknown or types!r}; choose from {', '.join(LOSSES)}")
    x = LossInputs(beta=beta, eps=label_smoothing, policy_chosen=policy_chosen,
                   policy_rejected=policy_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                   chosen_len=chosen_len, rejected_len=rejected_len,
                   sft_chosen_logps=policy_chosen if sft_chosen_logps is None else sft_chosen_logps,
                   f_type=f_divergence_type, f_alpha=f_alpha_divergence_coef,
                   discopop_tau=discopop_tau, simpo_gamma=simpo_gamma, orpo_lambda=orpo_lambda,
                   sft_tokens_per_pair=sft_tokens_per_pair)
    total = torch.zeros_like(policy_chosen)
    for name, w in zip(types, weights):
        x.current = name
        total = total + w * LOSSES[name](x)
    if use_weighting:
        if chosen_log_weight is None or rejected_log_weight is None:
            raise ValueError("use_weighting (WPO) needs chosen_log_weight and rejected_log_weight "
                             "(see wpo_log_weight)")
        total = total * torch.exp(chosen_log_weight.detach() + rejected_log_weight.detach()).to(total)
    x.current = types[0]
    if types[0] in REFERENCE_FREE_LOSSES:
        chosen_rewards, rejected_rewards = beta * policy_chosen / x.lc, beta * policy_rejected / x.lr
    else:
        chosen_rewards, rejected_rewards = beta * x.c, beta * x.r
    return PairLoss(total, chosen_rewards.detach(), rejected_rewards.detach())


def loss_from_config(cfg: LossConfig, policy_chosen: Tensor, policy_rejected: Tensor,
                     ref_chosen: Tensor | None = None, ref_rejected: Tensor | None = None,
                     ld_weighted: bool = False, **inputs: Tensor | None) -> PairLoss:
    """:func:`dpo_loss` with every option taken from ``cfg``. ``inputs``: chosen_len, rejected_len,
    chosen_log_weight, rejected_log_weight, sft_chosen_logps (see the module docstring).
    ``ld_weighted=True`` states that the log-probs passed are LD-weighted; it is required when
    ``cfg.ld_alpha`` is set, so that LD-DPO cannot silently be a no-op."""
    if cfg.ld_alpha is not None and not ld_weighted:
        raise ValueError("loss.ld_alpha is set: pass policy and reference log-probs weighted by "
                         "ld_weighted_logps(...) and ld_weighted=True")
    return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                    loss_type=cfg.loss_types, loss_weights=cfg.weights, beta=cfg.beta,
                    label_smoothing=cfg.label_smoothing, f_divergence_type=cfg.f_divergence_type,
                    f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
                    discopop_tau=cfg.discopop_tau, simpo_gamma=cfg.simpo_gamma,
                    orpo_lambda=cfg.orpo_lambda, use_weighting=cfg.use_weighting, **inputs)


def pair_metrics(out: PairLoss, policy_chosen: Tensor, policy_rejected: Tensor,
                 prefix: str = "") -> dict[str, float]:
    """TRL's metric names and definitions (batch means; accuracy is strict)."""
    cr, rr = out.chosen_rewards, out.rejected_rewards
    return {
        f"{prefix}loss": out.losses.mean().item(),
        f"{prefix}rewards/chosen": cr.mean().item(),
        f"{prefix}rewards/rejected": rr.mean().item(),
        f"{prefix}rewards/margins": (cr - rr).mean().item(),
        f"{prefix}rewards/accuracies": (cr > rr).float().mean().item(),
        f"{prefix}logps/chosen": policy_chosen.detach().mean().item(),
        f"{prefix}logps/rejected": policy_rejected.detach().mean().item(),
    }
