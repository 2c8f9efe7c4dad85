"""Early stopping: on a logged metric that stops improving, or on an extra rule installed around a
``train`` call (``extra_stop_rule``)."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable

from data_contracts.config import TrainConfig

# Extra stop rules ``rule(history) -> bool`` installed around a ``train`` call with ``extra_stop_rule``
# (e.g. a sweep's "this variant lags behind the best one", dpo_engine/sweep/early_stop.py).
_EXTRA_RULES: ContextVar[tuple] = ContextVar("dpo_extra_stop_rules", default=())


@contextmanager
def extra_stop_rule(rule: Callable[[list[dict]], bool] | None):
    """While the block runs, ``should_stop`` also stops when ``rule(history)`` is true
    (None: no extra rule). Thread-local: parallel trainings each see their own rules."""
    token = _EXTRA_RULES.set(_EXTRA_RULES.get() + ((rule,) if rule is not None else ()))
    try:
        yield
    finally:
        _EXTRA_RULES.reset(token)


def should_stop(history: list[dict], cfg: TrainConfig) -> bool:
    """True when ``cfg.early_stopping_metric`` has not improved over its best for ``patience``
    evaluations, or when an ``extra_stop_rule`` says so. Derived from the history (and, for an extra
    rule, what it reads), so a resumed run decides the same way."""
    if any(rule(history) for rule in _EXTRA_RULES.get()):
        return True
    name = cfg.early_stopping_metric
    if not name or not history or name not in history[-1]:
        # the verdict only changes at an evaluation, and a True one ends the training there (a
        # resumed run's last entry is that evaluation): no need to read the history between them
        return False
    values = [h[name] for h in history if name in h]
    best, since = None, 0
    for v in values:
        better = best is None or (v > best if cfg.early_stopping_mode == "max" else v < best)
        best, since = (v, 0) if better else (best, since + 1)
    return since >= cfg.early_stopping_patience
