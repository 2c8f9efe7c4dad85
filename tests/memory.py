"""Peak memory of this process while a block runs, for the hostile-data drills."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import psutil


class Peak:
    growth: int = 0  # peak RSS minus RSS at the start, bytes
    seconds: float = 0.0


@contextmanager
def peak_rss(every_s: float = 0.005):
    """Sample this process's RSS every ``every_s`` while the block runs: the peak, not the end state
    (a huge row's memory is given back after it). Yields a :class:`Peak` filled in at the end."""
    proc, out, done = psutil.Process(), Peak(), threading.Event()
    rss0 = proc.memory_info().rss
    peak = [rss0]

    def sample():
        while not done.wait(every_s):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        done.set()
        sampler.join()
        out.seconds, out.growth = time.perf_counter() - t0, peak[0] - rss0
