"""What every stage shares: content fingerprints, the stage index (reuse across runs), atomic JSON."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

from data_contracts.config import BUILTIN_DATASET, project_root, state_home
from dpo_engine.refcache import pid_alive

STAGES = ("validate", "precompute", "train", "evaluate", "register")


def fingerprint(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def atomic_path(path: Path) -> Path:
    """A temporary sibling of ``path`` to write to and then ``os.replace`` onto it: readers see
    the previous complete file or the new complete file, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_text(path: Path, text: str) -> None:
    tmp = atomic_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str))


def source_fingerprint(source: str | None) -> str:
    """Content hash of a local file or folder of files; the id itself for builtin/hub sources."""
    from dpo_engine.models import _file_sha256

    if source is None:
        return "none"
    if source.startswith(BUILTIN_DATASET):
        from data_contracts.builtin import DATASET_VERSION
        return f"{source}#{DATASET_VERSION}"
    p = Path(source).expanduser()
    if p.is_file():
        return _file_sha256(p)[:16]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        return fingerprint([(str(f.relative_to(p)), _file_sha256(f)) for f in files])
    return f"hub:{source}"


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


def _index_path(stage: str, fp: str) -> Path:
    return state_home() / "cache" / "stage_index" / f"{stage}-{fp}.json"


def lookup(stage: str, fp: str) -> dict | None:
    """A previous result with this fingerprint whose outputs all still exist, else None."""
    p = _index_path(stage, fp)
    try:
        res = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if all(Path(o).exists() for o in res.get("outputs", [])):
        return res
    return None


def outputs_token(stage: str, fp: str) -> str | None:
    """Identifies the recorded outputs (paths, sizes, mtimes) of a fingerprint; None if unusable."""
    res = lookup(stage, fp)
    if res is None:
        return None
    stats = [(o, os.stat(o).st_size, os.stat(o).st_mtime_ns) for o in res["outputs"]]
    return fingerprint(stats)[:8]


def record(stage: str, fp: str, result: dict) -> dict:
    """Index a fresh result for reuse and save it as <run_dir>/<stage>.json."""
    write_json(_index_path(stage, fp), result)
    write_json(Path(result["run_dir"]) / f"{stage}.json", result)
    _partial_path(stage, fp).unlink(missing_ok=True)
    return result


def _partial_path(stage: str, fp: str) -> Path:
    return state_home() / "cache" / "stage_index" / f"{stage}-{fp}.partial.json"


def _alive(pid, host) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process: cannot tell, so do not take its work over
    try:
        return pid_alive(int(pid))
    except (TypeError, ValueError):
        return True


def claim_partial(stage: str, fp: str, out: Path, keep: tuple[str, ...] = ("checkpoints", "mlflow_run_id"),
                  log=print) -> str | None:
    """Continue a stage that an earlier run (another run folder, same fingerprint) left unfinished:
    copy its resumable state (``keep``: e.g. training checkpoints and MLflow run id) into ``out``,
    unless ``out`` has state of its own or that run's process is still alive (a concurrent run is
    never taken over). Then record ``out`` as this fingerprint's unfinished work until ``record``.
    Returns the run folder taken over, or None."""
    marker, taken = _partial_path(stage, fp), None
    try:
        prev = json.loads(marker.read_text())
    except (OSError, ValueError):
        prev = None
    src = Path(prev["out"]) if prev else None
    if src and src != Path(out) and not any((Path(out) / k).exists() for k in keep) \
            and not _alive(prev.get("pid"), prev.get("host")) and src.is_dir():
        try:
            for name in keep:
                if not (src / name).exists():
                    continue
                tmp = atomic_path(Path(out) / name)
                if (src / name).is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                    shutil.copytree(src / name, tmp)
                else:
                    shutil.copy2(src / name, tmp)
                os.replace(tmp, Path(out) / name)
            taken = str(src.parent)
            log(f"{stage}: continuing the unfinished {stage} of run {src.parent.name}")
        except OSError as e:
            log(f"{stage}: could not take over the unfinished {stage} in {src} ({e}); starting afresh")
    write_json(marker, {"out": str(out), "pid": os.getpid(), "host": socket.gethostname()})
    return taken


def reused(stage: str, fp: str, run_dir: Path) -> dict | None:
    """An earlier result with the same fingerprint (saved into this run's folder), or None."""
    hit = lookup(stage, fp)
    if hit is None:
        return None
    src = Path(hit["run_dir"]).name
    summary = hit["summary"] if hit["summary"].startswith(f"{stage}: reused") else \
        f"{stage}: reused from run {src} ({hit['summary'].split(': ', 1)[-1]})"
    res = {**hit, "reused": True, "seconds": 0.0, "summary": summary}
    write_json(Path(run_dir) / f"{stage}.json", res)
    return res


def read_valid(path: str | Path):
    """An earlier stage's ``valid.parquet`` as a DataFrame; a damaged or missing file is a one-line
    DataError naming it (re-run validate), not a pyarrow traceback."""
    import pandas as pd
    import pyarrow as pa

    from data_contracts.errors import DataError

    try:
        return pd.read_parquet(path)
    except (OSError, pa.ArrowException, ValueError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data error: {path} is missing or not a readable Parquet file ({why}); "
                        f"re-run the validate stage to rebuild it") from None


def load_result(run_dir: Path, stage: str) -> dict:
    """The saved result of an earlier stage of this run (for the per-stage CLI commands)."""
    p = Path(run_dir) / f"{stage}.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run `dpo {stage} --run-dir {run_dir}` first")
    return json.loads(p.read_text())


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
