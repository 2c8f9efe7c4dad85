"""The MLflow client, the retry policy for an unreachable tracking store, and connecting to a store.

An unreachable tracking server is survived, not fatal (RELIABILITY.md, drill 2): every write goes
through :func:`call`, which retries transient failures (connection refused, time-outs, HTTP 5xx,
a locked SQLite store) with exponential back-off for up to ``RetryPolicy.timeout_s`` and then
raises a one-line :class:`TrackingUnavailable`.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from data_contracts.helpers import file_lock, redact_credentials


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached or created (one-line message)."""


def mlflow_client() -> MlflowClient:
    """A client of the store :func:`connect` pointed MLflow at. Callers look it up on this module
    at call time (``client.mlflow_client()``), so tests can stand in a failing client."""
    return MlflowClient()


@dataclass
class RetryPolicy:
    """How long writes keep trying an unreachable tracking store: ``timeout_s`` in all (0: one
    try), waiting ``backoff_s`` after the first failure, doubling up to ``max_backoff_s``."""
    timeout_s: float = 0.0
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    @classmethod
    def from_config(cls, registry_cfg) -> "RetryPolicy":
        return cls(timeout_s=registry_cfg.retry_timeout_s, backoff_s=registry_cfg.retry_backoff_s,
                   max_backoff_s=registry_cfg.retry_max_backoff_s)


_policy = RetryPolicy()
_TRANSIENT_TEXT = ("failed with exception", "failed with timeout exception", "connection refused",
                   "connection aborted", "connection reset", "max retries exceeded",
                   "database is locked", "temporarily unavailable", "remote end closed",
                   "bad gateway", "service unavailable", "gateway timeout", "response code 5")
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED", "REQUEST_LIMIT_EXCEEDED"}


def default_policy() -> RetryPolicy:
    """The retry policy given to the last :func:`connect` (one try before any)."""
    return _policy


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause chain) means "the tracking store did not answer" rather than
    "the request is wrong": those are retried, the others raised at once."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "transient", False):
            return True
        if isinstance(exc, (ConnectionError, TimeoutError, urllib.error.URLError)):
            return True
        if type(exc).__module__.startswith(("requests", "urllib3")) and \
                type(exc).__name__ in ("ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout",
                                       "ProtocolError", "NewConnectionError", "MaxRetryError"):
            return True
        if isinstance(exc, MlflowException) and getattr(exc, "error_code", None) in _TRANSIENT_CODES:
            return True
        text = str(exc).lower()
        if isinstance(exc, (MlflowException, OSError)) or type(exc).__name__ == "OperationalError":
            if any(t in text for t in _TRANSIENT_TEXT):
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def failure_reason(exc: BaseException) -> str:
    """A short reason for a failed store request, credentials redacted (for one-line messages)."""
    text = redact_credentials(" ".join(str(exc).split()) or type(exc).__name__)
    for marker in ("Connection refused", "timed out", "Read timed out", "database is locked"):
        if marker in text:
            return marker
    return text[:200]


def call(what: str, fn: Callable, *args, policy: RetryPolicy | None = None,
         log: Callable[[str], None] = print, **kwargs):
    """``fn(*args, **kwargs)``, retried with exponential back-off while the tracking store is
    unreachable, for up to ``policy.timeout_s`` (default: the policy given to :func:`connect`).
    Then a one-line :class:`TrackingUnavailable` naming ``what``. Other errors raise at once."""
    policy = policy or _policy
    t0 = time.monotonic()
    wait, attempt = policy.backoff_s, 1
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified below
            if not is_transient(e):
                raise
            spent = time.monotonic() - t0
            left = policy.timeout_s - spent
            if left <= 0:
                raise TrackingUnavailable(
                    f"MLflow tracking store {redact_credentials(mlflow.get_tracking_uri())} unavailable: "
                    f"{what} failed {attempt} time(s) over {spent:.0f}s ({failure_reason(e)})") from None
            pause = min(wait, left)
            log(f"MLflow unavailable ({what}: {failure_reason(e)}); try {attempt + 1} in {pause:.1f}s")
            time.sleep(pause)
            wait, attempt = min(wait * 2, policy.max_backoff_s), attempt + 1


def retried(what: str):
    """Decorator: the function's MLflow calls go through :func:`call` (whole function retried)."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return call(what, fn, *args, **kwargs)
        return wrapper
    return deco


def _unavailable(uri: str, reason: Any) -> TrackingUnavailable:
    reason = " ".join(str(reason).split()) or type(reason).__name__
    return TrackingUnavailable(redact_credentials(f"cannot reach MLflow tracking server at {uri}: {reason}; "
                                                  "start it or set tracking.mlflow_tracking_uri"))


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(unquote(path))


HTTP_DEFAULTS = {  # MLflow's own HTTP retries (7, backoff 2: minutes per call) off: call() retries
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def connect(tracking_uri: str, timeout: float = 3.0, retry: RetryPolicy | None = None,
            wait: bool = False, check: bool = True) -> None:
    """Point MLflow tracking and registry at ``tracking_uri``; fail fast if it cannot be used
    (``wait``: keep checking under ``retry`` first; ``check=False``: no check, for writers that
    go through an :class:`~dpo_engine.tracking.outbox.Outbox`). ``retry`` becomes the policy of
    later writes (default: one try). For an HTTP server MLflow's own per-request retries are turned
    off unless set in the environment (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
    ``MLFLOW_HTTP_REQUEST_TIMEOUT``)."""
    global _policy
    _policy = retry or RetryPolicy()
    scheme, db = urlparse(tracking_uri).scheme, None
    if scheme in ("http", "https"):
        for k, v in HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        if urlparse(tracking_uri).password is not None:  # MLflow would print the URI at each run's end
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        mlflow.set_tracking_uri(tracking_uri)  # named by call()'s message while waiting
        if not check:
            pass
        elif wait:
            call("health check", _check_health, tracking_uri, timeout, policy=retry or _policy)
        else:
            _check_health(tracking_uri, timeout)
    elif (db := _sqlite_path(tracking_uri)) is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _unavailable(tracking_uri, f"cannot create folder {db.parent}: "
                               f"{e.strerror or e}") from None
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    if db is not None and tracking_uri not in _opened:
        _open_sqlite_store(db)
        _opened.add(tracking_uri)


_opened: set[str] = set()


def _open_sqlite_store(db: Path) -> None:
    """Create (or migrate) a SQLite store under a file lock: two processes creating the same new
    store at once would both run its migrations and one would fail ("table ... already exists")."""
    quiet = [logging.getLogger(n) for n in ("mlflow.store.db.utils", "alembic.runtime.migration")]
    levels = [q.level for q in quiet]
    with file_lock(db.with_name(f".{db.name}.lock")):
        try:
            for q in quiet:  # "Creating initial MLflow database tables...": not for the console
                q.setLevel(logging.WARNING)
            client = mlflow_client()
            call("open store", client.search_experiments, max_results=1)
            call("open store", client.search_registered_models, max_results=1)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)


def _check_health(tracking_uri: str, timeout: float) -> None:
    """GET <server>/health; a TrackingUnavailable marked ``transient`` when it does not answer."""
    parts = urlparse(tracking_uri.rstrip("/") + "/health")
    request = urllib.request.Request(parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl())
    if parts.username is not None:  # user:password@ in the URI: sent as basic auth, as MLflow does
        token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode())
        request.add_header("Authorization", f"Basic {token.decode()}")
    status, reason = None, None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
    if reason is None and status is not None and status < 400:
        return
    err = _unavailable(tracking_uri, reason if reason is not None else f"GET /health returned HTTP {status}")
    err.transient = reason is not None or status >= 500
    raise err
