"""The project's shared low-level helpers, each in exactly one place: atomic writes, file locks,
process liveness, content hashes and fingerprints, credential redaction.

Every layer (data contracts, engine, tasks, flows) uses these; none of them imports anything of
the project's except the state home (for the file-hash memo).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock, SoftFileLock, Timeout

from data_contracts.state import state_home

# Atomic writes.
# A writer writes a temporary sibling ".<name>[.<thread>].tmp<pid>" and renames it onto the target:
# readers see the previous complete file or the new one, never half of one. The pid at the end lets
# any later reader tell a killed writer's leftover (dead pid) from a live writer's file.

TEMP_RE = re.compile(r"^\..+\.tmp(\d+)$")


def atomic_path(path: Path) -> Path:
    """The temporary sibling of ``path`` to write and then ``os.replace`` onto it (parents created).
    Unique per process and thread."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    thread = "" if threading.current_thread() is threading.main_thread() else f".{threading.get_ident()}"
    return path.with_name(f".{path.name}{thread}.tmp{os.getpid()}")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Any:
    """``write(tmp)`` writes a file (or folder) at ``tmp``; it then replaces ``path`` in one rename
    and returns what ``write`` returned. A failed write leaves ``path`` as it was and removes its
    temporary file; a write that creates nothing at ``tmp`` leaves ``path`` as it was too."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        result = write(tmp)
        if tmp.is_dir() and path.is_dir():  # a rename does not replace a folder that has files:
            old = path.with_name(f".{path.name}.old{tmp.name[len(path.name) + 1:]}")  # .<name>.old[.thread].tmp<pid>
            os.replace(path, old)  # the old one aside first, so a kill leaves it whole (or the new one)
            os.replace(tmp, path)
            import shutil  # only for folder writes

            shutil.rmtree(old, ignore_errors=True)
        elif tmp.exists():
            os.replace(tmp, path)
        return result
    except BaseException:
        if tmp.is_dir():
            import shutil  # only on the failure path of a folder write

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj: Any, **dumps_kwargs) -> None:
    """``obj`` as JSON (``indent=2``, ``default=str`` unless given), written atomically."""
    dumps_kwargs.setdefault("indent", 2)
    dumps_kwargs.setdefault("default", str)
    write_text(path, json.dumps(obj, **dumps_kwargs))


def remove_dead_temps(path: Path) -> list[str]:
    """Remove the temporary siblings of ``path`` (``.<name>.tmp<pid>``, ``.<name>.old.tmp<pid>``) whose
    writer no longer runs on this machine: what a killed :func:`atomic_write` left (a whole copy of a
    model's weights, say). Call it before writing ``path``; a live writer's are left alone (a writer
    on another machine sharing the folder would look dead: do not share a target across machines)."""
    path = Path(path)
    mine = re.compile(rf"^\.{re.escape(path.name)}(\.old)?(\.\d+)?\.tmp\d+$")
    removed = []
    for f in path.parent.glob(f".{glob.escape(path.name)}*.tmp*"):
        if not mine.match(f.name) or not dead_writer_temp(f.name):
            continue
        import shutil

        shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink(missing_ok=True)
        removed.append(f.name)
    return removed


def dead_writer_temp(name: str) -> bool:
    """Whether ``name`` is the temporary file of a writer that is no longer running on this machine."""
    m = TEMP_RE.match(name)
    return m is not None and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1)))


# Locks and liveness.

LOCK_KINDS = ("native", "soft")


class LockKindError(ValueError):
    """``DPO_LOCK_KIND`` does not suit this file system (a user error: one line)."""


def lock_kind() -> str:
    """``$DPO_LOCK_KIND``: ``native`` (default) or ``soft``; see :func:`file_lock`."""
    kind = os.environ.get("DPO_LOCK_KIND", "").strip().lower() or "native"
    if kind not in LOCK_KINDS:
        raise LockKindError(f"DPO_LOCK_KIND={kind!r}: use native (flock; the default) or soft (a state "
                            "home on a shared file system whose flock is missing or per machine)")
    return kind


@contextmanager
def file_lock(path: Path, block: bool = True) -> Iterator[bool]:
    """An exclusive lock on the file ``path`` (created, parents too), shared by threads and processes;
    yields True, or False at once when ``block`` is False and another holds it. Not reentrant: each
    call is its own holder, so two threads of one process exclude each other, and a thread asking
    again for a lock it holds gets False (``block=False``) or RuntimeError (it would wait forever).

    One ``filelock`` lock object per call, of the kind ``$DPO_LOCK_KIND`` names:

    - ``native`` (default): ``FileLock``, an ``flock`` on the file (which stays). The kernel drops it
      when its holder dies. Right on one machine, and on NFS, where Linux maps ``flock`` to NFS locks.
      A file system without ``flock`` is a LockKindError naming the file, not a silent soft lock.
    - ``soft``: ``SoftFileLock``, the file itself is the lock (created exclusively, holding the
      holder's pid and host; removed on release), for a state home shared by several machines on a
      file system whose ``flock`` is missing or per machine (Lustre mounted ``localflock`` or
      ``noflock``, some FUSE file systems). A holder killed on this machine is seen dead and its
      lock taken over; one killed on another machine leaves its lock file behind, and every waiter
      waits until someone deletes it (check first that the process it names is gone).
    """
    path = Path(path)  # filelock creates the parents
    if lock_kind() == "soft":
        lock = SoftFileLock(path, poll_interval=0.05)
    else:  # a file system without flock is an error that says so, not a silent soft lock
        lock = FileLock(path, poll_interval=0.005, fallback_to_soft=False)
    try:
        lock.acquire(blocking=block)
    except Timeout:
        yield False
        return
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise LockKindError(f"{path}: this file system has no flock; set DPO_LOCK_KIND=soft") from None
        raise
    try:
        yield True
    finally:
        lock.release()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (another user's live process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


def owner_alive(pid: Any, host: str | None) -> bool:
    """Whether the process that recorded (``pid``, ``host``) may still run. A process of another
    machine counts as alive: it cannot be checked, so its work is never taken over."""
    if host != socket.gethostname():
        return True
    try:
        return pid_alive(int(pid))
    except (TypeError, ValueError):
        return True


# Hashes.

def fingerprint(*parts: Any) -> str:
    """A short (16 hex) sha256 of JSON-serialisable ``parts`` (keys sorted; other objects as str)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks."""
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11: the loop runs in C
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        return h.hexdigest()


def file_sha256(path: Path) -> str:
    """:func:`sha256_file`, memoised under the state home on (path, size, mtime) so that big weights
    are hashed once across runs. One small memo file per (path, size, mtime), written atomically:
    constant cost per file however many are memoised, and concurrent writers never lose each
    other's entries."""
    path = Path(path)
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo = state_home() / "cache" / "file_hashes" / hashlib.sha256(key.encode()).hexdigest()[:32]
    try:
        stored_key, digest = memo.read_text().split("\n")[:2]
        if stored_key == key and len(digest) == 64:
            return digest
    except (OSError, ValueError):
        pass
    digest = sha256_file(path)
    write_text(memo, f"{key}\n{digest}\n")
    return digest


# Redaction.

_URL_CREDENTIALS = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]+@")


def redact_credentials(text: Any) -> str:
    """``text`` with the user:password of every URL in it replaced by ``***`` (never printed or logged)."""
    return _URL_CREDENTIALS.sub(r"\1***@", str(text))
