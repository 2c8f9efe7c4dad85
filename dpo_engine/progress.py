"""Progress of a running stage, for whoever shows it (the Prefect tasks install a reporter that writes a
progress artifact and a log line; without one, reports go nowhere). The engine never imports Prefect:
a stage calls :func:`report` (or a :class:`Meter`) with ``(stage, done, total, metrics)``, and the
reporter installed with :func:`reporting` in the calling thread (a context variable: a thread or a
task of its own never sees another's) receives it.

Training reports at every ``train.logging_steps`` step and at the last, with the logged metrics
(loss, reward accuracy, margin, tokens per second, ...); the reference precompute reports per batch,
at most about ``Meter.updates`` times per split, and when the split is done (its cached shards
included). A reporter that raises is the reporter's problem: the stage goes on.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

Reporter = Callable[[str, int, int, dict], None]  # (stage, done, total, metrics)

_reporter: ContextVar[Reporter | None] = ContextVar("dpo_progress_reporter", default=None)
_meter: ContextVar["Meter | None"] = ContextVar("dpo_progress_meter", default=None)
log = logging.getLogger(__name__)


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Send this thread's progress reports to ``reporter`` inside the block."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def report(stage: str, done: int, total: int, metrics: dict | None = None) -> None:
    """``done`` of ``total`` units of ``stage`` (e.g. "train", "precompute train") are finished."""
    reporter = _reporter.get()
    if reporter is None:
        return
    try:
        reporter(stage, int(done), int(total), dict(metrics or {}))
    except Exception as e:  # noqa: BLE001 - showing progress never stops the work
        log.warning("progress report for %s failed: %s: %s", stage, type(e).__name__, e)


def reported(log_fn: Callable[[dict, int], None] | None, stage: str, total: int
             ) -> Callable[[dict, int], None] | None:
    """``log_fn(metrics, step)`` (training's logging-step callback) that also reports ``step`` of
    ``total`` with the logged metrics."""
    if log_fn is None:
        return None

    def log_and_report(metrics: dict, step: int) -> None:
        log_fn(metrics, step)
        report(stage, step, total, metrics)

    return log_and_report


def advance(n: int = 1) -> None:
    """``n`` more units done of the :class:`Meter` active in this thread (none: nothing)."""
    meter = _meter.get()
    if meter is not None:
        meter.advance(n)


class Meter:
    """Counts units of ``stage`` towards ``total`` and reports about ``updates`` times in all (every
    ``total / updates`` units) and once ``total`` is reached: per-batch progress without a report per
    batch. As a context manager it is the thread's active meter (:func:`advance`) and finishes when
    the block ends without an error."""

    def __init__(self, stage: str, total: int, updates: int = 20):
        self.stage, self.total, self.done = stage, max(0, int(total)), 0
        self.every = max(1, -(-self.total // max(1, updates)))
        self._next: float = min(self.every, self.total) if self.total else float("inf")

    def advance(self, n: int = 1) -> None:
        self.done += int(n)
        if self.done < self._next:
            return
        # the next report after the next multiple of `every`, the last at `total`, then none
        self._next = min(self.total, (self.done // self.every + 1) * self.every) \
            if self.done < self.total else float("inf")
        report(self.stage, min(self.done, self.total), self.total)

    def __enter__(self) -> "Meter":
        self._token = _meter.set(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        _meter.reset(self._token)
        if exc_type is None:
            self.finish()

    def finish(self) -> None:
        """The stage is complete (also the units that were not counted, e.g. read from a cache)."""
        if self._next != float("inf"):
            self.done, self._next = max(self.done, self.total), float("inf")
            report(self.stage, self.total, self.total)
