"""The stage index: which stage outputs exist for which content fingerprint, so that a run reuses an
earlier run's outputs (or continues its unfinished work) instead of computing them again. Also each
stage's saved result in a run folder."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

from data_contracts.helpers import atomic_write, fingerprint, owner_alive, sha256_file, write_json
from data_contracts.state import state_home


def _index_path(stage: str, fp: str) -> Path:
    return state_home() / "cache" / "stage_index" / f"{stage}-{fp}.json"


def content_digest(path: Path) -> str:
    """The sha256 of a file, or of a folder's files (relative names and contents), read in full."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        return fingerprint([(str(f.relative_to(path)), sha256_file(f)) for f in files])
    return sha256_file(path)


def lookup(stage: str, fp: str) -> dict | None:
    """A previous result with this fingerprint whose outputs all still exist with the content they
    were recorded with (sha256), else None: an output changed since, or a record without hashes
    (an older version's), is not trusted and the stage runs again."""
    p = _index_path(stage, fp)
    try:
        res = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    outputs, hashes = res.get("outputs", []), res.get("output_sha256")
    if not all(Path(o).exists() for o in outputs) or (outputs and not isinstance(hashes, dict)):
        return None
    try:
        if any(content_digest(Path(o)) != hashes.get(o) for o in outputs):
            return None
    except OSError:
        return None
    return res


def outputs_token(stage: str, fp: str) -> str | None:
    """Identifies the recorded outputs (paths, sizes, mtimes) of a fingerprint; None if unusable."""
    res = lookup(stage, fp)
    if res is None:
        return None
    stats = [(o, os.stat(o).st_size, os.stat(o).st_mtime_ns) for o in res["outputs"]]
    return fingerprint(stats)[:8]


def record(stage: str, fp: str, result: dict) -> dict:
    """Index a fresh result for reuse (with its outputs' content hashes) and save it as
    <run_dir>/<stage>.json."""
    result = {**result, "output_sha256": {o: content_digest(Path(o)) for o in result.get("outputs", [])}}
    write_json(_index_path(stage, fp), result)
    write_json(Path(result["run_dir"]) / f"{stage}.json", result)
    _partial_path(stage, fp).unlink(missing_ok=True)
    return result


def _partial_path(stage: str, fp: str) -> Path:
    return state_home() / "cache" / "stage_index" / f"{stage}-{fp}.partial.json"


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
            and not owner_alive(prev.get("pid"), prev.get("host")) and src.is_dir():
        try:
            for name in keep:
                if not (src / name).exists():
                    continue
                copy = shutil.copytree if (src / name).is_dir() else shutil.copy2
                atomic_write(Path(out) / name, lambda tmp: copy(src / name, tmp))
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


def load_result(run_dir: Path, stage: str) -> dict:
    """The saved result of an earlier stage of this run (for the per-stage CLI commands)."""
    p = Path(run_dir) / f"{stage}.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run `dpo {stage} --run-dir {run_dir}` first")
    return json.loads(p.read_text())
