"""What runs around every stage's work: its wall-clock timer, the git commit it ran from, and the named
points where the crash drills kill it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from data_contracts.state import project_root

KILL_ENV = "DPO_TEST_KILL_AT"  # crash drills: "<stage>:<point>" SIGKILLs the process at that point


def crash_point(stage: str, point: str) -> None:
    """A named point inside a stage where the crash drill (tests/test_reliability_crash.py) can
    SIGKILL the process: set ``DPO_TEST_KILL_AT=<stage>:<point>``. The whole process group dies when
    this process leads one (a preempted machine: Prefect's temporary server goes too). No-op
    otherwise."""
    if os.environ.get(KILL_ENV) != f"{stage}:{point}":
        return
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def code_version(root: Path | None = None) -> str | None:
    """The git commit checked out at ``root`` (default: this checkout), read from ``.git`` without
    running git; None outside a git checkout."""
    git = Path(root or project_root() or ".") / ".git"
    try:
        if git.is_file():  # a worktree: ".git" names the real git folder
            git = (git.parent / git.read_text().strip().removeprefix("gitdir: ")).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None  # detached HEAD
        ref = head[len("ref: "):]
        if (git / "commondir").is_file():
            git = (git / (git / "commondir").read_text().strip()).resolve()
        if (git / ref).is_file():
            return (git / ref).read_text().strip() or None
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split(" ", 1)[0]
    except OSError:
        return None
    return None


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
