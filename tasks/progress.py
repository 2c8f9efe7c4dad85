"""What a running stage's progress looks like in the Prefect UI: the reporter a stage task installs
for the engine (:mod:`dpo_engine.progress`) writes one progress artifact per reported stage part
(key ``dpo-train-progress``, ``dpo-precompute-train-progress``, ...: created at the first report,
updated at every later one) and a log line per report, e.g.
``train: step 20/64 (31%), loss 0.6812, reward accuracy 0.62, margin 0.041, 1,840 tokens/s``.
When the stage returns, every artifact it made is set to 100% (a training stopped early, or a split
partly read from the cache, is still finished)."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from typing import Iterator
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from dpo_engine import progress
from tasks.artifacts import ui_write

# the logged metrics a report line shows, and how
TRAIN_FIELDS = (("loss", "loss {:.4f}"), ("rewards/accuracies", "reward accuracy {:.2f}"),
                ("rewards/margins", "margin {:.3f}"), ("tokens_per_second", "{:,.0f} tokens/s"))


def artifact_key(stage: str) -> str:
    """``dpo-<stage>-progress`` in the characters an artifact key may hold (lowercase, digits, dashes)."""
    return "dpo-" + re.sub(r"[^a-z0-9]+", "-", stage.lower()).strip("-") + "-progress"


def describe(stage: str, done: int, total: int, metrics: dict) -> str:
    """The log line (and artifact description) of one report."""
    pct = 100.0 * done / total if total else 100.0
    head = f"{stage}: step {done}/{total}" if stage == "train" else f"{stage}: {done:,}/{total:,} sequences"
    parts = [f"{head} ({pct:.0f}%)"]
    parts += [fmt.format(metrics[k]) for k, fmt in TRAIN_FIELDS if isinstance(metrics.get(k), (int, float))]
    return ", ".join(parts)


class ArtifactReporter:
    """A :data:`dpo_engine.progress.Reporter`: reports to progress artifacts and ``logger``."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter):
        self.logger = logger
        self.artifacts: dict[str, UUID] = {}  # stage part -> its progress artifact
        self.last: dict[str, tuple[float, str]] = {}  # stage part -> (progress, description)
        self.updates = 0

    def __call__(self, stage: str, done: int, total: int, metrics: dict) -> None:
        line = describe(stage, done, total, metrics)
        self.logger.info(line)
        self._show(stage, 100.0 * done / total if total else 100.0, line)

    def _show(self, stage: str, pct: float, line: str) -> None:
        pct = min(100.0, max(0.0, pct))
        if stage not in self.artifacts:
            made = ui_write(f"progress of {stage}", create_progress_artifact, pct, key=artifact_key(stage),
                            description=line)
            if made is None:
                return
            self.artifacts[stage] = made
        else:
            if ui_write(f"progress of {stage}", update_progress_artifact, self.artifacts[stage], pct,
                        description=line) is None:
                return
            self.updates += 1
        self.last[stage] = (pct, line)

    def complete(self) -> None:
        """Every artifact of this stage at 100%: the stage returned."""
        for stage, (pct, line) in list(self.last.items()):
            if pct < 100.0:
                try:
                    self._show(stage, 100.0, f"{line} - done")
                except Exception as e:  # noqa: BLE001 - the UI's bar never fails a finished stage
                    self.logger.warning(f"progress artifact of {stage}: {type(e).__name__}: {e}")


@contextmanager
def reporting(logger: logging.Logger | logging.LoggerAdapter) -> Iterator[ArtifactReporter]:
    """Inside the block, the engine's progress reports (this thread's) go to an
    :class:`ArtifactReporter`; its artifacts are completed when the block ends without an error."""
    reporter = ArtifactReporter(logger)
    with progress.reporting(reporter):
        yield reporter
    reporter.complete()
