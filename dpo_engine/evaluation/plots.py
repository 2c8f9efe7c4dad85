"""PNG plots of a run (training curves, judged eval scores) and of several runs side by side.

Figures are built with matplotlib's object API (``matplotlib.figure.Figure``), which renders with
the Agg backend and never touches pyplot's global state or a display. Matplotlib's cache lives
under the state home (``MPLCONFIGDIR``), never in ``$HOME``.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_contracts.state import local_state_env

TRAIN_CURVES = ("loss", "rewards/margins", "rewards/accuracies")
COMPARE_CURVES = ("rewards/margins", "rewards/accuracies")


def _figure(ncols: int, width: float = 4.5, height: float = 3.4):
    os.environ.setdefault("MPLCONFIGDIR", local_state_env()["MPLCONFIGDIR"])
    from matplotlib.figure import Figure  # lazy: matplotlib reads MPLCONFIGDIR when first imported

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path


def training_curves(history: list[dict], path: str | Path) -> Path | None:
    """Loss, reward margin and reward accuracy per optimizer step; None without any history."""
    names = [n for n in TRAIN_CURVES if any(n in h for h in history)]
    if not names:
        return None
    fig, axes = _figure(len(names))
    for ax, name in zip(axes, names):
        pts = [(h.get("step", i + 1), h[name]) for i, h in enumerate(history) if name in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def eval_scores(table, metrics: dict[str, float], path: str | Path) -> Path | None:
    """Per-prompt judgements (a pointwise judge's score distributions, policy vs reference; a pairwise
    judge's P(policy better)) and the raw and length-controlled win-rates with their 95% CIs; None
    when the table has no judgements."""
    columns = getattr(table, "columns", [])
    if table is None or table.empty or not ("policy_score" in columns or "p_policy_first" in columns):
        return None
    fig, (dist, win) = _figure(2)
    if "policy_score" in columns:
        scores = [table["policy_score"].astype(float), table["reference_score"].astype(float)]
        lo = min(float(s.min()) for s in scores)  # any judge's scale (a reward model's is unbounded)
        hi = max(float(s.max()) for s in scores)
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        dist.hist(scores, bins=10, range=(lo, hi), label=["policy", "reference"])
        dist.set(title="judge score per prompt", xlabel="score", ylabel="prompts")
        dist.legend()
    else:
        dist.hist(table["win"].astype(float), bins=10, range=(0.0, 1.0))
        dist.set(title="pairwise judgement per prompt", xlabel="P(policy better), both orders", ylabel="prompts")
    bars = [(label, metrics[key], metrics.get(f"{key}_ci_low", metrics[key]),
             metrics.get(f"{key}_ci_high", metrics[key]))
            for label, key in (("raw", "eval/win_rate"), ("length-controlled", "eval/lc_win_rate")) if key in metrics]
    if not bars and "win" in columns:
        rate = float(table["win"].mean())
        bars = [("raw", rate, rate, rate)]
    if bars:
        win.bar([b[0] for b in bars], [b[1] for b in bars], capsize=8,
                yerr=[[max(0.0, b[1] - b[2]) for b in bars], [max(0.0, b[3] - b[1]) for b in bars]])
        win.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    win.set(title="win-rate vs reference (95% CI)", ylim=(0.0, 1.0))
    return _save(fig, path)


def compare_runs(curves: dict[str, dict[str, list[tuple[int, float]]]],
                 win_rates: dict[str, tuple[float, float, float] | None], path: str | Path,
                 metrics: tuple[str, ...] = COMPARE_CURVES) -> Path:
    """Several runs overlaid: one panel per training metric (``curves[label][metric]`` =
    [(step, value)]) and a panel of eval win-rates (``win_rates[label]`` = (rate, low, high))."""
    fig, axes = _figure(len(metrics) + 1)
    for ax, name in zip(axes, metrics):
        for label, hist in curves.items():
            pts = hist.get(name) or []
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    win = axes[-1]
    labels = [k for k, v in win_rates.items() if v is not None]
    rates = [win_rates[k] for k in labels]
    if labels:
        win.bar(range(len(labels)), [r[0] for r in rates], capsize=6,
                yerr=[[max(0.0, r[0] - r[1]) for r in rates], [max(0.0, r[2] - r[0]) for r in rates]])
        win.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize="small")
        win.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    win.set(title="eval win-rate (95% CI)", ylim=(0.0, 1.0))
    return _save(fig, path)
