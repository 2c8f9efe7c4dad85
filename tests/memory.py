"""Peak memory of this process and its worker processes while a block runs, for the hostile-data
drills.

The tree's memory is this process's RSS plus each live descendant's USS (its private pages). Not the
plain sum of RSS: a forked worker starts out sharing every page of the parent copy-on-write, and
its RSS counts them all again (measured: two idle workers forked by a 324 MiB test process showed
210 MiB RSS and 3 MiB USS each), so a sum of RSS "grows" by the parent's size per worker without a
byte being allocated. A worker's USS does count what it really adds: what it allocates and the
inherited pages it writes to (copied then). The plain sum of RSS is kept too
(:attr:`Peak.peak_rss_sum`), for comparison.

Sampled, so a worker that lives less than a sample or two (a pool that gets one small batch) may
not be seen at all: :attr:`Peak.max_children` says whether it was; :func:`worker_batches` says for
certain which processes prepared batches.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
import time
from contextlib import contextmanager

import psutil

_GONE = (psutil.NoSuchProcess, psutil.AccessDenied)  # ZombieProcess is a NoSuchProcess


class Peak:
    growth: int = 0  # peak tree memory minus the tree's memory at the start, bytes
    seconds: float = 0.0
    peak_tree: int = 0  # peak tree memory (this process's RSS + descendants' USS), bytes
    peak_rss_sum: int = 0  # peak of the plain sum of RSS over the tree (counts shared pages again)
    parent_growth: int = 0  # peak RSS of this process alone minus its RSS at the start
    max_children: int = 0  # most live descendants seen in one sample
    max_child_uss: int = 0  # the largest USS one descendant reached, bytes
    samples: int = 0


class _Tree:
    """Samples of a process tree. A descendant's USS (``memory_full_info``: its smaps_rollup, ~3
    ms, which holds up the worker's page faults meanwhile) is read when it is first seen and every
    ``uss_every`` samples; in between it is moved by the change of its RSS (cheap: statm), which
    follows what the worker allocates and frees; the pages it copies on write (which do not change
    its RSS) are caught at the next USS read."""

    def __init__(self, uss_every: int):
        self.proc, self.uss_every, self.n = psutil.Process(), uss_every, 0
        self.kids: dict[int, list] = {}  # pid -> [Process, USS, RSS when that USS was read]

    def sample(self) -> tuple[int, int, int, int, int]:
        """(this process's RSS + descendants' USS, sum of RSS, live descendants, this process's
        RSS, largest USS of one descendant). A descendant that vanishes between the listing and
        the reading (a worker exiting) is skipped."""
        rss = self.proc.memory_info().rss
        tree, rss_sum, n, most = rss, rss, 0, 0
        try:
            listed = self.proc.children(recursive=True)
        except _GONE:
            listed = []
        fresh = self.n % self.uss_every == 0
        self.n += 1
        for kid in listed:
            known = self.kids.get(kid.pid)
            try:
                if known is None or fresh:
                    info = (known[0] if known else kid).memory_full_info()
                    known = self.kids[kid.pid] = [known[0] if known else kid, info.uss, info.rss]
                    uss, kid_rss = info.uss, info.rss
                else:
                    kid_rss = known[0].memory_info().rss
                    uss = max(0, known[1] + kid_rss - known[2])
            except _GONE:
                self.kids.pop(kid.pid, None)
                continue
            tree, rss_sum, n, most = tree + uss, rss_sum + kid_rss, n + 1, max(most, uss)
        return tree, rss_sum, n, rss, most


def release_free_memory() -> None:
    """Give freed memory back to the OS before a measurement, so that the block cannot grow into
    memory an earlier test freed but the allocators kept (which would hide its growth): a garbage
    collection, glibc's ``malloc_trim(0)``, and Arrow's pool (mimalloc keeps freed buffers)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()


@contextmanager
def peak_rss(every_s: float = 0.005, uss_every: int = 10):
    """Sample the memory of this process and of all its live descendants (worker processes) every
    ``every_s`` while the block runs (each worker's USS read every ``uss_every`` samples, see
    :class:`_Tree`): the peak, not the end state (a huge row's memory is given back after it).
    Yields a :class:`Peak` filled in at the end; ``growth`` is over the tree at the start (after
    :func:`release_free_memory`)."""
    release_free_memory()
    tree, out, done = _Tree(uss_every), Peak(), threading.Event()
    first = tree.sample()
    peak = [*first, 1]  # tree, RSS sum, descendants, this process's RSS, one child's USS, samples

    def sample():
        while not done.wait(every_s):
            for k, v in enumerate(tree.sample()):
                peak[k] = max(peak[k], v)
            peak[5] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        done.set()
        sampler.join()
        out.seconds = time.perf_counter() - t0
        out.peak_tree, out.peak_rss_sum, out.max_children, rss, out.max_child_uss, out.samples = peak
        out.growth, out.parent_growth = out.peak_tree - first[0], rss - first[3]


_NOTE: str | None = None  # file the forked validation workers append their pid to
_WORK = None  # the real data_contracts.validation.workers._work while worker_batches patches it


def _noted_work(rows, idx, lines):
    """workers._work, then this process's pid and the number of rows appended to _NOTE (one line
    per batch or part of one it prepared). Module level, so that ProcessPoolExecutor can pickle it
    by name for a forked worker."""
    n = len(rows)
    out = _WORK(rows, idx, lines)
    with open(_NOTE, "a") as f:
        f.write(f"{os.getpid()} {n}\n")
    return out


class Parts(list):
    """One pid per batch, or part of a batch (``workers.part_bytes``), that a worker prepared;
    ``rows``: how many rows those held in all."""
    rows = 0


@contextmanager
def worker_batches(note):
    """Which processes prepared validation batches while the block ran: yields a :class:`Parts`
    filled at the end with one pid per batch or part of one that a worker
    (``data_contracts.validation.workers._work``) prepared successfully; empty when validation ran
    in this process only. ``note``: a scratch file path."""
    global _NOTE, _WORK
    from data_contracts.validation import workers

    _NOTE, _WORK = str(note), workers._work
    workers._work = _noted_work
    pids = Parts()
    try:
        yield pids
    finally:
        workers._work, _WORK = _WORK, None
        if os.path.exists(note):
            with open(note) as f:
                for line in f:
                    pid, n = line.split()
                    pids.append(int(pid))
                    pids.rows += int(n)
            os.unlink(note)
