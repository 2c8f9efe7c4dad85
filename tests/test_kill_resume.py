"""SIGKILL the training process mid-run, twice; re-running resumes and ends with the weights of an
uninterrupted run (CPU, fp32)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tiny import tiny_model_dir

WORKER = Path(__file__).with_name("kill_resume_worker.py")


def _start(model_dir, out, pause):
    return subprocess.Popen([sys.executable, str(WORKER), str(model_dir), str(out), str(pause)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _kill_after_checkpoint(proc, out: Path, step: int, timeout: float = 120) -> None:
    t0 = time.time()
    while not (out / "checkpoints" / f"step-{step}" / "state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - t0 < timeout, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_twice_then_resume_matches_uninterrupted(tmp_path):
    model_dir = tiny_model_dir(tmp_path / "m")
    ref = _start(model_dir, tmp_path / "ref", 0.0)
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]

    out = tmp_path / "killed"
    _kill_after_checkpoint(_start(model_dir, out, 0.5), out, 2)
    _kill_after_checkpoint(_start(model_dir, out, 0.5), out, 5)
    last = _start(model_dir, out, 0.0)
    assert last.wait(timeout=300) == 0, last.stderr.read().decode()[-2000:]
    assert int((out / "resumed_from.txt").read_text()) >= 5  # continued, did not start over
    a, b = load_file(tmp_path / "ref" / "final.safetensors"), load_file(out / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
