"""Length-controlled win-rate (AlpacaEval 2's idea): the win-rate the policy would have against the
reference if both answered at the same length.

A logistic regression of the per-prompt judgement ``y`` in [0, 1] (1: policy better, 0.5: tie, or a
pairwise judge's probability) on the length difference, with an intercept::

    logit P(policy better) = b0 + b1 * tanh(d / std(d)),   d = policy chars - reference chars

The length-controlled win-rate is the prediction at ``d = 0``, ``sigmoid(b0)``; ``b1`` (the length
coefficient) says how much the judge's preference follows the length difference: a high raw win-rate
with a large positive ``b1`` and a length-controlled win-rate near 0.5 means the policy won by getting
longer. Lengths are in characters (the unit AlpacaEval uses; any judge sees text, not tokens); the
``tanh`` of the standardised difference keeps a few very long answers from dominating the fit. Unlike
AlpacaEval there is one model and one baseline, so there is no per-instruction difficulty term.

Fitted by Newton's method (iteratively reweighted least squares) with a small L2 penalty on both
coefficients, so that separable data (every prompt won, or won exactly when longer) gives finite
coefficients instead of diverging. Fractional targets are fitted as they are (quasi-binomial
likelihood). The interval is a seeded percentile bootstrap over prompts, the same resamples as the raw
win-rate's interval (:func:`~dpo_engine.evaluation.statistics.resample_indices`), every resample
fitted at once (batched Newton).
"""

from __future__ import annotations

import numpy as np

from dpo_engine.evaluation.statistics import percentile_interval, resample_indices

L2 = 1e-3  # penalty on the coefficients: negligible for a fit with a solution, finite for separable data
MAX_ITER = 100
TOL = 1e-9


def length_feature(length_diff: np.ndarray) -> np.ndarray:
    """tanh(d / std(d)); zeros when the differences do not vary (then only the intercept is fitted)."""
    d = np.asarray(length_diff, dtype=float)
    std = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    return np.tanh(d / std) if std > 0 else np.zeros_like(d)


def _loss(z: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float) -> np.ndarray:
    """Penalised negative log-likelihood per fit: sum(log(1 + e^z) - y z) + l2/2 |w|^2."""
    return (np.logaddexp(0.0, z) - y * z).sum(axis=-1) + 0.5 * l2 * (w * w).sum(axis=-1)


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = L2) -> np.ndarray:
    """Penalised logistic regression, batched: ``x`` (..., n, k) features (include a column of ones for
    an intercept), ``y`` (..., n) targets in [0, 1] -> coefficients (..., k). Newton steps with
    step halving (the penalised loss never goes up), until every fit's step is below TOL."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    w = np.zeros(x.shape[:-2] + x.shape[-1:])
    eye = np.eye(x.shape[-1])
    xt = np.swapaxes(x, -1, -2)
    loss = _loss(_dot(x, w), y, w, l2)
    for _ in range(MAX_ITER):
        p = _sigmoid(_dot(x, w))
        grad = _dot(xt, p - y) + l2 * w
        hess = xt @ (x * (p * (1.0 - p))[..., None]) + l2 * eye
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        t = np.ones(w.shape[:-1])
        for _ in range(40):  # halve the step of each fit whose loss would go up
            cand = w - t[..., None] * step
            new = _loss(_dot(x, cand), y, cand, l2)
            worse = new > loss + 1e-12
            if not worse.any():
                break
            t = np.where(worse, t / 2, t)
        taken = np.where(worse[..., None], 0.0, t[..., None] * step)  # a fit at its optimum stays
        w, loss = w - taken, np.where(worse, loss, new)
        if np.abs(taken).max() < TOL:
            break
    return w


def length_controlled(y: np.ndarray, policy_len: np.ndarray, reference_len: np.ndarray, *,
                      n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """The length-controlled win-rate and its 95% bootstrap interval over prompts, the length
    coefficient and the mean length difference (policy minus reference, characters). ``y``: the
    per-prompt judgement in [0, 1]."""
    y = np.asarray(y, dtype=float)
    if not len(y):
        return {}
    d = np.asarray(policy_len, dtype=float) - np.asarray(reference_len, dtype=float)
    x = np.stack([np.ones_like(d), length_feature(d)], axis=-1)
    b0, b1 = fit_logistic(x, y)
    idx = resample_indices(len(y), n=n_boot, seed=seed)
    boot = fit_logistic(x[idx], y[idx])
    lo, hi = percentile_interval(_sigmoid(boot[:, 0]))
    return {"eval/lc_win_rate": _sigmoid(b0), "eval/lc_win_rate_ci_low": lo, "eval/lc_win_rate_ci_high": hi,
            "eval/length_coef": float(b1), "eval/mean_length_diff": float(d.mean())}


def _dot(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Batched matrix-vector product: (..., a, b) @ (..., b) -> (..., a)."""
    return (m @ v[..., None])[..., 0]


def _sigmoid(z):
    out = 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=float)))  # no overflow for large |z|
    return float(out) if out.ndim == 0 else out
