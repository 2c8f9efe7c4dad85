"""Statistics of an evaluation: bootstrap intervals, the KL estimate, response lengths."""

from __future__ import annotations

import numpy as np


def resample_indices(size: int, *, n: int = 2000, seed: int = 0) -> np.ndarray:
    """``n`` bootstrap resamples of ``size`` items, drawn with replacement: an (n, size) index array
    (the same draws for the same seed, so statistics resampled with one seed share their resamples)."""
    return np.random.default_rng(seed).integers(0, size, size=(n, size))


def percentile_interval(estimates: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap estimates."""
    return float(np.quantile(estimates, 0.025)), float(np.quantile(estimates, 0.975))


def bootstrap_ci(values: np.ndarray, *, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if len(values) == 0:
        return float("nan"), float("nan")
    return percentile_interval(values[resample_indices(len(values), n=n, seed=seed)].mean(axis=1))


def kl_metrics(diffs: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """The KL estimate with its 95% bootstrap interval."""
    lo, hi = bootstrap_ci(diffs, seed=seed)
    mean = float(diffs.mean()) if len(diffs) else float("nan")
    return {"eval/kl_policy_reference": mean, "eval/kl_policy_reference_ci_low": lo,
            "eval/kl_policy_reference_ci_high": hi}


def length_metrics(name: str, ids: list[list[int]], max_new_tokens: int) -> dict[str, float]:
    """Response length statistics in tokens: mean, median, max and the share cut at max_new_tokens."""
    n = np.array([len(x) for x in ids], dtype=float)
    if not len(n):
        return {}
    return {f"eval/{name}_response_tokens": float(n.mean()),
            f"eval/{name}_response_tokens_median": float(np.median(n)),
            f"eval/{name}_response_tokens_max": float(n.max()),
            f"eval/{name}_response_truncated": float((n >= max_new_tokens).mean())}
