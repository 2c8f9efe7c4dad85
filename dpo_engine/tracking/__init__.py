"""MLflow tracking and model registry for DPO runs (pure library, no Prefect).

Every function works on an explicit run id through :class:`mlflow.MlflowClient`, so stages running
in separate processes can log to the same run; nothing is left as MLflow's "active run".

Local stores (sqlite) keep all artifacts under ``state_home()/mlflow/artifacts/<experiment>``,
never in ``./mlruns`` or ``$HOME``.

A registered model is an MLflow ``transformers`` model (task ``text-generation``): its artifacts
hold ``model/`` (config.json, generation_config.json, model.safetensors) and
``components/tokenizer/`` (tokenizer files and chat_template.jinja). ``download_hf_folder`` puts
them back together as one Hugging Face folder; ``load_registered`` loads (model, tokenizer).

A PEFT adapter export (``peft.export: adapter``) is registered as base + adapter in MLflow's own
PEFT layout: ``model/`` holds the base model's weights (read from the folder named by the
adapter's ``base_model_name_or_path``), ``peft/`` the adapter (adapter_config.json,
adapter_model.safetensors) and the flavor's ``peft_adaptor`` key points at it, so
``mlflow.pyfunc.load_model`` and ``mlflow.transformers.load_model`` apply the adapter to the base.
The version is self-contained: the base folder is needed when registering, not when loading.
Its tags say ``model_format=adapter`` with the base (``adapter_base_model``).

An unreachable tracking server is survived, not fatal (RELIABILITY.md, drill 2): every write goes
through :func:`call`, which retries transient failures (connection refused, time-outs, HTTP 5xx,
a locked SQLite store) with exponential back-off for up to ``RetryPolicy.timeout_s`` and then
raises a one-line :class:`TrackingUnavailable`. Training and evaluation write through an
:class:`Outbox` instead: entries go to a JSONL file under ``state_home()/mlflow/outbox/`` first and
are sent when the server answers (training never waits for it); registration sends what is still
pending, waiting for the server under the policy, before it registers.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
import json
import math
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from data_contracts.state import state_home

from data_contracts.helpers import redact_credentials
from dpo_engine.modeling import LOAD_LOCK
from data_contracts.helpers import file_lock

CHALLENGER = "challenger"
CHAMPION = "champion"
MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_LEN = 5000  # registry tag value limit
BATCH = 100  # params/tags per log_batch request
DEFAULT_METRICS = ["rewards/margins", "rewards/accuracies", "loss",
                   "eval/rewards/accuracies", "eval/win_rate"]
TAGGED_METRICS = ["eval/win_rate", "eval/win_rate_ci_low", "eval/win_rate_ci_high",
                  "eval/rewards/accuracies", "eval/rewards/margins", "eval/loss",
                  "eval/policy_score", "eval/kl_policy_reference"]  # copied onto version tags
METRIC_TAG = "metric."  # version tag prefix: metric.eval/win_rate
KEY_PARAMS = ["loss.loss_type", "loss.beta", "loss.label_smoothing", "train.learning_rate",
              "train.per_device_train_batch_size", "train.gradient_accumulation_steps",
              "train.max_steps", "train.num_train_epochs", "model.name_or_path", "data.source"]


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached or created (one-line message)."""


def _client() -> MlflowClient:
    return MlflowClient()


# ------------------------------------------------------------------------------------- retries

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


_redact = redact_credentials  # user:password in a URI is never printed


def _reason(exc: BaseException) -> str:
    text = _redact(" ".join(str(exc).split()) or type(exc).__name__)
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
                    f"MLflow tracking store {_redact(mlflow.get_tracking_uri())} unavailable: {what} failed "
                    f"{attempt} time(s) over {spent:.0f}s ({_reason(e)})") from None
            pause = min(wait, left)
            log(f"MLflow unavailable ({what}: {_reason(e)}); try {attempt + 1} in {pause:.1f}s")
            time.sleep(pause)
            wait, attempt = min(wait * 2, policy.max_backoff_s), attempt + 1


def _unavailable(uri: str, reason: Any) -> TrackingUnavailable:
    reason = " ".join(str(reason).split()) or type(reason).__name__
    return TrackingUnavailable(_redact(f"cannot reach MLflow tracking server at {uri}: {reason}; "
                                       "start it or set tracking.mlflow_tracking_uri"))


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(unquote(path))


def _is_local_store(uri: str) -> bool:
    return urlparse(uri).scheme in ("sqlite", "file", "")


def _retried(what: str):
    """Decorator: the function's MLflow calls go through :func:`call` (whole function retried)."""
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return call(what, fn, *args, **kwargs)
        return wrapper
    return deco


# ----------------------------------------------------------------------------------------- connect

HTTP_DEFAULTS = {  # MLflow's own HTTP retries (7, backoff 2: minutes per call) off: call() retries
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def connect(tracking_uri: str, timeout: float = 3.0, retry: RetryPolicy | None = None,
            wait: bool = False, check: bool = True) -> None:
    """Point MLflow tracking and registry at ``tracking_uri``; fail fast if it cannot be used
    (``wait``: keep checking under ``retry`` first; ``check=False``: no check, for writers that
    go through an :class:`Outbox`). ``retry`` becomes the policy of later writes (default: one try).
    For an HTTP server MLflow's own per-request retries are turned off unless set in the
    environment (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``)."""
    global _policy
    _policy = retry or RetryPolicy()
    scheme, db = urlparse(tracking_uri).scheme, None
    if scheme in ("http", "https"):
        for k, v in HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
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
    import fcntl
    import logging

    quiet = [logging.getLogger(n) for n in ("mlflow.store.db.utils", "alembic.runtime.migration")]
    levels = [q.level for q in quiet]
    with open(db.with_name(f".{db.name}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            for q in quiet:  # "Creating initial MLflow database tables...": not for the console
                q.setLevel(logging.WARNING)
            client = _client()
            call("open store", client.search_experiments, max_results=1)
            call("open store", client.search_registered_models, max_results=1)
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_health(tracking_uri: str, timeout: float) -> None:
    """GET <server>/health; a TrackingUnavailable marked ``transient`` when it does not answer."""
    url = tracking_uri.rstrip("/") + "/health"
    status, reason = None, None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
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


# ------------------------------------------------------------------------------------ experiments

@_retried("create experiment")
def ensure_experiment(name: str) -> str:
    """Experiment id of ``name``, created (or restored) if needed."""
    client = _client()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if _is_local_store(mlflow.get_tracking_uri()):
            folder = state_home() / "mlflow" / "artifacts" / name
            folder.mkdir(parents=True, exist_ok=True)
            location = folder.as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


@_retried("start run")
def start_run(experiment: str, run_name: str, tags: dict | None = None,
              run_id: str | None = None) -> str:
    """Create a run (or re-open ``run_id``) and return its id. It is not made the active run."""
    client = _client()
    if run_id:
        run = client.get_run(run_id)
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        if tags:
            set_tags(run_id, tags)
        return run_id
    exp_id = ensure_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name,
                            tags={k: str(v) for k, v in (tags or {}).items()})
    return run.info.run_id


@_retried("end run")
def end_run(run_id: str, status: str = "FINISHED") -> None:
    _client().set_terminated(run_id, status=status)


# -------------------------------------------------------------------------------------- logging

def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{'loss': {'beta': 0.1}}`` -> ``{'loss.beta': 0.1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


@_retried("log params")
def log_params(run_id: str, params: dict) -> None:
    """Log (nested) params. Keys already logged with the same value are skipped; a different
    value for an existing key raises ValueError (MLflow params are immutable)."""
    client = _client()
    existing = client.get_run(run_id).data.params
    new, changed = [], []
    for key, value in flatten(params).items():
        value = str(value)[:MAX_PARAM_LEN]
        if key not in existing:
            new.append(Param(key, value))
        elif existing[key] != value:
            changed.append(f"{key} ({existing[key]!r} -> {value!r})")
    if changed:
        raise ValueError(f"run {run_id} already has different values for params: "
                         + ", ".join(changed))
    for i in range(0, len(new), BATCH):
        client.log_batch(run_id, params=new[i:i + BATCH])


@_retried("log metrics")
def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    """Log metrics in one batch; names are kept as given (``rewards/margins``). None is skipped."""
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
    for i in range(0, len(items), 1000):
        _client().log_batch(run_id, metrics=items[i:i + 1000])


@_retried("set tags")
def set_tags(run_id: str, tags: dict) -> None:
    items = [RunTag(k, str(v)[:MAX_TAG_LEN]) for k, v in tags.items()]
    for i in range(0, len(items), BATCH):
        _client().log_batch(run_id, tags=items[i:i + BATCH])


@_retried("log artifact")
def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file, or every file of a folder, under ``artifact_path``."""
    path = Path(path)
    if path.is_dir():
        _client().log_artifacts(run_id, str(path), artifact_path)
    else:
        _client().log_artifact(run_id, str(path), artifact_path)


@_retried("log dict")
def log_dict(run_id: str, dictionary: dict, filename: str) -> None:
    """Write ``dictionary`` as JSON/YAML (by ``filename``'s suffix) into the run's artifacts."""
    _client().log_dict(run_id, dictionary, filename)


@_retried("log table")
def log_table(run_id: str, table, artifact_file: str) -> None:
    """Log a DataFrame as an MLflow table (shown in the UI's artifact view and Evaluation tab).
    Logged again (a re-run after a crash), it replaces the table: MLflow's ``log_table`` would
    append the rows a second time."""
    import posixpath

    client = _client()
    folder = posixpath.dirname(posixpath.normpath(artifact_file)) or None
    if artifact_file not in [f.path for f in client.list_artifacts(run_id, path=folder)]:
        client.log_table(run_id, data=table, artifact_file=artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:  # the same file MLflow writes, over the old one
        path = Path(tmp) / posixpath.basename(artifact_file)
        table.to_json(path, orient="split", index=False, date_format="iso")
        client.log_artifact(run_id, str(path), folder)


class Outbox:
    """Writes to one MLflow run that must not be lost while the tracking store is unreachable.

    Each entry (a metrics batch with its step and time stamp, an artifact file, a table) is first
    appended to ``state_home()/mlflow/outbox/<run_id>.jsonl``, then everything pending is sent. When
    the store does not answer, the entries stay in the file (surviving a crash too) and sending is
    tried again after a back-off (``RetryPolicy.backoff_s`` doubling to ``max_backoff_s``) on a
    later entry, or by :meth:`send` with ``wait=True`` (registration does that). Metrics are resent
    with their original time stamps, which MLflow stores once, so a resend after a partial send
    adds nothing; sent entries leave the file as they are confirmed.

    ``background=True`` (training): a send runs on a daemon thread and the caller never waits, so a
    tracking server that hangs (accepts, never answers: each request waits the HTTP time-out) does
    not stall the steps; :meth:`drain` waits a bounded time for what is pending. Appends and the
    removal of sent entries hold a file lock, so entries queued while a send runs are kept.
    """

    def __init__(self, run_id: str, folder: Path | None = None, log: Callable[[str], None] = print,
                 background: bool = False):
        self.run_id = run_id
        self.path = Path(folder or state_home() / "mlflow" / "outbox") / f"{run_id}.jsonl"
        self.log = log
        self.background = background
        self._sender: threading.Thread | None = None
        self._next_try = 0.0
        self._wait: float | None = None

    def _file_lock(self, kind: str = "lock", block: bool = True):
        """``lock``: held while the file changes; ``send``: held by the one sender (any thread or
        process) so two never send the same entries and drop each other's. Non-blocking: yields
        False when another holds it."""
        return file_lock(self.path.with_name(f".{self.path.name}.{kind}"), block=block)

    # -- queueing
    def _append(self, entry: dict) -> None:
        with self._file_lock(), open(self.path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell():  # a crash mid-line must not swallow this entry
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(json.dumps(entry).encode() + b"\n")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> bool:
        items = {k: float(v) for k, v in metrics.items() if v is not None}
        if items:
            self._append({"metrics": items, "step": step or 0, "ts": int(time.time() * 1000)})
        return self.send()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        self._append({"artifact": str(Path(path).resolve()), "artifact_path": artifact_path})
        return self.send()

    def log_table(self, jsonl: str | Path, artifact_file: str) -> bool:
        """The JSONL file ``jsonl`` (one row per line) as an MLflow table."""
        self._append({"table": str(Path(jsonl).resolve()), "artifact_file": artifact_file})
        return self.send()

    def pending(self) -> list[dict]:
        """Entries not yet confirmed sent (a line cut short by a crash is reported and skipped)."""
        try:
            with self._file_lock():
                lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                self.log(f"outbox {self.path}: line {i + 1} was cut short by a crash; skipped")
        return out

    # -- sending
    def _drop_sent(self, n: int) -> None:
        """Remove the first ``n`` entries (confirmed sent) from the file, keeping whatever was
        appended since they were read (cut lines among them were reported by :meth:`pending`)."""
        with self._file_lock():
            try:
                lines = self.path.read_bytes().splitlines()
            except FileNotFoundError:
                return
            kept, seen = [], 0
            for line in lines:
                if not line.strip():
                    continue
                if seen < n:
                    try:
                        json.loads(line)
                        seen += 1
                    except ValueError:
                        pass
                    continue
                kept.append(line)
            if not kept:
                self.path.unlink(missing_ok=True)
                return
            tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
            tmp.write_bytes(b"".join(line + b"\n" for line in kept))
            os.replace(tmp, self.path)

    def _send_once(self, block: bool = True) -> bool:
        """Send the pending entries in order; False (nothing done) when another sender is at it and
        ``block`` is False."""
        with self._file_lock("send", block=block) as mine:
            if not mine:
                return False
            self._send_pending()
            return True

    def _send_pending(self) -> None:
        entries = self.pending()
        client = _client()
        done = 0
        while done < len(entries):
            e = entries[done]
            if "metrics" in e:
                batch, n = [], 0
                while done + n < len(entries) and "metrics" in entries[done + n] and len(batch) < 900:
                    m = entries[done + n]
                    batch += [Metric(k, v, m["ts"], m["step"]) for k, v in m["metrics"].items()]
                    n += 1
                for i in range(0, len(batch), 1000):  # MLflow's limit per request
                    client.log_batch(self.run_id, metrics=batch[i:i + 1000])
            else:
                n = 1
                src = e.get("artifact") or e.get("table")
                if not Path(src).exists():  # said, not silently dropped
                    self.log(f"outbox {self.path}: {src} no longer exists; not sent to MLflow")
                elif "artifact" in e:
                    if Path(e["artifact"]).is_dir():
                        client.log_artifacts(self.run_id, e["artifact"], e.get("artifact_path"))
                    else:
                        client.log_artifact(self.run_id, e["artifact"], e.get("artifact_path"))
                elif "table" in e:
                    import pandas as pd
                    log_table(self.run_id, pd.read_json(e["table"], lines=True), e["artifact_file"])
            done += n
            self._drop_sent(n)

    def send(self, wait: bool = False, policy: RetryPolicy | None = None) -> bool:
        """Send what is pending. ``wait=False``: one try (none while backing off); an unreachable
        store returns False and keeps the entries. ``wait=True``: retried under ``policy``
        (default: the one given to :func:`connect`); TrackingUnavailable when it runs out."""
        if wait and self._sender is not None:
            self._sender.join()  # one sender at a time
        if not self.path.is_file():
            return True
        if wait:
            call("send buffered metrics and artifacts", self._send_once, policy=policy, log=self.log)
            self._wait = None
            return True
        if time.monotonic() < self._next_try:
            return False
        if self.background:
            if self._sender is None or not self._sender.is_alive():
                self._sender = threading.Thread(target=self._send_in_background, args=(policy,),
                                                daemon=True, name=f"outbox-{self.run_id[:8]}")
                self._sender.start()
            return False
        return self._try_send(policy)

    def drain(self, timeout_s: float) -> bool:
        """Background mode: wait up to ``timeout_s`` for the running send, then one more try for what
        is still pending (unless backing off). True when nothing is pending."""
        deadline = time.monotonic() + timeout_s
        for _ in range(2):
            if self._sender is not None:
                self._sender.join(max(0.0, deadline - time.monotonic()))
                if self._sender.is_alive():
                    return False
            if not self.path.is_file():
                return True
            self.send()
        return not self.path.is_file()

    def _send_in_background(self, policy: RetryPolicy | None) -> None:
        try:
            self._try_send(policy)
        except Exception as e:  # noqa: BLE001 - no caller to raise to: said, entries kept
            self.log(f"outbox {self.path}: sending failed ({_reason(e)}); entries kept for the "
                     "register stage")

    def _try_send(self, policy: RetryPolicy | None = None) -> bool:
        try:
            if not self._send_once(block=False):
                return False  # another sender holds the file: it sends these entries too
        except Exception as e:  # noqa: BLE001
            if not is_transient(e):
                raise
            policy = policy or _policy
            if self._wait is None:
                self.log(f"MLflow unavailable ({_reason(e)}); metrics kept in {self.path} and sent "
                         "when it answers")
            self._wait = policy.backoff_s if self._wait is None else min(self._wait * 2,
                                                                         policy.max_backoff_s)
            self._next_try = time.monotonic() + self._wait
            return False
        if self._wait is not None:
            self.log(f"MLflow reachable again: buffered entries of run {self.run_id} sent")
        self._wait = None
        return True


def metric_histories(run_id: str, names: list[str]) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` sorted by step; metrics the run lacks are left out."""
    client = _client()
    out = {}
    for name in names:
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        if hist:
            out[name] = hist
    return out


def win_rate(run_id: str) -> tuple[float, float, float] | None:
    """(eval win-rate, 95% CI low, high) of a run, or None if it was not judged."""
    m = _client().get_run(run_id).data.metrics
    if "eval/win_rate" not in m:
        return None
    rate = m["eval/win_rate"]
    return rate, m.get("eval/win_rate_ci_low", rate), m.get("eval/win_rate_ci_high", rate)


# -------------------------------------------------------------------------------------- registry

def _pip_requirements(adapter: bool = False) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    packages = ("transformers", "torch", "tokenizers", "safetensors", "accelerate")
    for pkg in packages + (("peft",) if adapter else ()):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            if pkg != "accelerate":
                reqs.append(pkg)
    return reqs


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL, ADAPTER = "full", "adapter"  # version tag model_format


def model_format(model_dir: str | Path) -> str:
    """``adapter`` for a PEFT adapter folder (adapter_config.json; safetensors weights required),
    ``full`` for a Hugging Face model folder (config.json); FileNotFoundError otherwise."""
    model_dir = Path(model_dir)
    if (model_dir / ADAPTER_CONFIG).is_file():
        if not (model_dir / ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(f"{model_dir} is a PEFT adapter folder without {ADAPTER_WEIGHTS} "
                                    "(only safetensors adapter weights are registered)")
        return ADAPTER
    if (model_dir / "config.json").is_file():
        return FULL
    raise FileNotFoundError(f"{model_dir} is neither a Hugging Face model folder (no config.json) "
                            f"nor a PEFT adapter folder (no {ADAPTER_CONFIG})")


def adapter_base(adapter_dir: str | Path) -> tuple[str, str | None]:
    """(base model folder or hub id, revision) an adapter folder was trained on, from its
    adapter_config.json. A local base must exist (its weights are logged with the adapter)."""
    adapter_dir = Path(adapter_dir)
    conf = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base = conf.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG} names no base_model_name_or_path")
    path = Path(base).expanduser()
    if path.is_absolute() or base.startswith((".", "~")) or path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"base model folder {base} of adapter {adapter_dir} not found (no "
                                    "config.json): the adapter is registered with its base's weights")
        return str(path.resolve()), None
    return base, conf.get("revision")


def _adapter_tags(adapter_dir: Path) -> dict[str, str]:
    conf = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    tags = {"model_format": ADAPTER, "adapter_base_model": conf.get("base_model_name_or_path"),
            "adapter_peft_type": conf.get("peft_type")}
    if conf.get("revision"):
        tags["adapter_base_revision"] = conf["revision"]
    return {k: str(v) for k, v in tags.items() if v is not None}


class _TransformersWithAdapter:
    """A flavor for ``Model.log``: ``mlflow.transformers.save_model`` of the plain base model, then
    the adapter added where MLflow keeps a PEFT model's (``peft/`` and the flavor key
    ``peft_adaptor``): MLflow's loaders build ``PeftModel.from_pretrained(base, peft/)``.

    Not ``mlflow.transformers.log_model(PeftModel)``: for a base that is a local folder (no hub
    id) it saves the base's state dict with the LoRA layers injected (``...q_proj.base_layer.weight``
    and ``lora_A``/``lora_B``), which loads back with those projections newly initialised; and with
    ``base_model_path`` it only references a folder that every machine loading it must have."""

    __name__ = "mlflow.transformers"  # the flavor named on a LoggedModel that Model.log creates

    def __init__(self, adapter_dir: Path):
        self.adapter_dir = adapter_dir

    def save_model(self, path, mlflow_model, **kwargs):
        from mlflow.transformers.flavor_config import FlavorKey
        from mlflow.transformers.peft import _PEFT_ADAPTOR_DIR_NAME
        from mlflow.utils.file_utils import get_total_file_size
        from peft import PeftModel

        mlflow.transformers.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        path = Path(path)
        dest = path / _PEFT_ADAPTOR_DIR_NAME
        dest.mkdir()
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy2(self.adapter_dir / name, dest / name)
        mlflow_model.flavors["transformers"][FlavorKey.PEFT] = _PEFT_ADAPTOR_DIR_NAME
        if size := get_total_file_size(str(path)):
            mlflow_model.model_size_bytes = size
        mlflow_model.save(str(path / "MLmodel"))
        # the base's weights are saved: the adapter must apply to it (shape mismatches raise here,
        # before anything is uploaded; MLflow's own input-example check would only warn)
        with LOAD_LOCK:
            PeftModel.from_pretrained(kwargs["transformers_model"]["model"], str(dest))


def _log_hf_model(run_id: str, model_dir: Path, base_model_revision: str | None = None) -> tuple[str, str]:
    """Log ``model_dir`` to the run as an MLflow transformers model; returns (model_uri, model_id).
    An adapter folder is logged with its base model (see :class:`_TransformersWithAdapter`)."""
    from mlflow.models import Model, infer_signature
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = model_format(model_dir) == ADAPTER
    weights_dir, revision = adapter_base(model_dir) if adapter else (str(model_dir), None)
    if adapter and not Path(weights_dir).is_dir():  # a hub id: the revision it was trained on
        revision = revision or base_model_revision
    client = _client()
    run = client.get_run(run_id)
    with LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(weights_dir, revision=revision, use_safetensors=True,
                                                     trust_remote_code=False)
    # the trained folder's tokenizer (chat template included); an adapter folder without one: the base's
    if (model_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(weights_dir, revision=revision, trust_remote_code=False)
    # Create the LoggedModel in the run's experiment ourselves: left to MLflow it would land in the
    # default experiment (./mlruns) since there is no active run.
    logged = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id)
    example = "Hello"
    signature = infer_signature(example, ["text"],
                                params={"max_new_tokens": 64, "do_sample": False,
                                        "temperature": 1.0, "top_p": 1.0})
    kw = dict(transformers_model={"model": model, "tokenizer": tokenizer}, name="model",
              task="text-generation", run_id=run_id, model_id=logged.model_id,
              pip_requirements=_pip_requirements(adapter), signature=signature, input_example=example,
              model_config={"max_new_tokens": 64}, tags={"run_id": run_id})
    if adapter:
        info = Model.log(artifact_path=None, flavor=_TransformersWithAdapter(model_dir), **kw)
    else:
        info = mlflow.transformers.log_model(**kw)
    return info.model_uri, info.model_id


def _version_of_run(model_name: str, run_id: str):
    """The first (lowest) version of ``model_name`` registered from ``run_id``, or None."""
    client = _client()
    found = [mv for mv in client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
             if mv.tags.get("run_id") == run_id]
    return min(found, key=lambda mv: int(mv.version)) if found else None


@contextmanager
def _registration_lock(model_name: str, run_id: str):
    """Serialise registrations of one (model, run) among processes sharing this state home."""
    import hashlib

    name = hashlib.sha256(f"{model_name}\0{run_id}".encode()).hexdigest()[:24]
    with file_lock(state_home() / "locks" / f"register-{name}.lock"):
        yield


def _gate(metrics: dict[str, float], thresholds: dict[str, float]) -> list[str]:
    """Reasons the gate fails (empty list: passed)."""
    reasons = []
    for name, minimum in thresholds.items():
        if metrics.get(name) is None:
            reasons.append(f"{name}: missing from metrics (required >= {minimum:g})")
            continue
        value = float(metrics[name])
        if math.isnan(value) or value < minimum:
            reasons.append(f"{name}: {value:.4g} < required {minimum:g}")
    return reasons


def champion(model_name: str):
    """The model version holding alias ``champion`` (with its tags), or None."""
    try:
        return _client().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as e:  # no such model or no champion yet; an outage is not "no champion"
        if is_transient(e):
            raise
        return None


def version_metric(mv, metric: str) -> float | None:
    """``metric`` of a model version: its ``metric.<name>`` tag, else its run's latest value."""
    if METRIC_TAG + metric in mv.tags:
        return float(mv.tags[METRIC_TAG + metric])
    if not mv.run_id:
        return None
    return _client().get_run(mv.run_id).data.metrics.get(metric)


def _champion_gate(model_name: str, run_id: str, metrics: dict[str, float], metric: str,
                   min_improvement: float) -> list[str]:
    """Reasons the candidate does not beat the current champion by ``min_improvement`` on
    ``metric``. No champion yet, the candidate itself, or a champion without the metric: passes."""
    champ = champion(model_name)
    if champ is None or champ.run_id == run_id:
        return []
    best = version_metric(champ, metric)
    if best is None or math.isnan(best):
        return []
    value = metrics.get(metric)
    if value is None or math.isnan(float(value)):
        return [f"{metric}: missing from metrics (required to beat champion version {champ.version})"]
    if float(value) - best < min_improvement:
        return [f"{metric}: {float(value):.4g} does not beat champion version {champ.version} "
                f"({best:.4g}) by >= {min_improvement:g}"]
    return []


def _version_tags(run_id: str, metrics: dict[str, float], reasons: list[str],
                  tags: dict | None) -> dict[str, str]:
    out = {k: str(v)[:MAX_TAG_LEN] for k, v in (tags or {}).items() if v is not None}
    out.update({METRIC_TAG + m: repr(float(metrics[m])) for m in TAGGED_METRICS
                if metrics.get(m) is not None})
    out.update({"run_id": run_id, "gate_passed": str(not reasons).lower()})
    if reasons:
        out["gate_reasons"] = "; ".join(reasons)[:MAX_TAG_LEN]
    return out


@_retried("register model")
def register_model(run_id: str, model_dir: str | Path, model_name: str, *,
                   metrics: dict[str, float], gate_thresholds: dict[str, float],
                   tags: dict[str, str] | None = None, beat_champion_metric: str | None = None,
                   min_improvement: float = 0.0,
                   on_step: Callable[[str], None] | None = None,
                   base_model_revision: str | None = None) -> dict:
    """Log the Hugging Face folder ``model_dir`` to the run, register it as a new version of
    ``model_name`` with alias ``challenger``, and make it ``champion`` when every gate metric
    is >= its threshold and, with ``beat_champion_metric``, it beats the current champion on that
    metric by at least ``min_improvement``. The version is tagged with ``tags``, the key eval
    metrics (``metric.<name>``) and the gate's outcome. Idempotent per (model_name, run_id), so a
    retry after an outage or a crash at any point leaves exactly one version. ``on_step(point)``
    is called at ``model-logged``, ``version-created`` and ``aliases-set`` (crash drills).

    ``model_dir`` may also be a PEFT adapter folder (adapter_config.json + adapter_model.safetensors):
    it is logged with the weights of the base model its adapter_config.json names (a local folder,
    or a hub id read from the local cache at ``base_model_revision``), and tagged ``model_format``
    ``adapter``, ``adapter_base_model``, ``adapter_peft_type`` (``base_model`` too unless given)."""
    on_step = on_step or (lambda point: None)
    model_dir = Path(model_dir)
    model_format(model_dir)  # a folder that cannot be registered fails before anything is logged
    client = _client()
    reasons = _gate(metrics, gate_thresholds)
    if beat_champion_metric:
        reasons += _champion_gate(model_name, run_id, metrics, beat_champion_metric, min_improvement)
    with _registration_lock(model_name, run_id):
        mv, newest = _create_version_once(client, model_name, run_id, model_dir, metrics, reasons, tags,
                                          on_step, base_model_revision)
    if newest:
        # aliases belong to the model: one writer at a time in this state home (two registrations
        # setting the same alias at once hit a unique-key error in the store)
        with _registration_lock(model_name, "\0aliases"):
            _set_alias(client, model_name, CHALLENGER, mv.version)
            if not reasons:
                _set_alias(client, model_name, CHAMPION, mv.version)
        on_step("aliases-set")
    aliases = sorted(client.get_model_version(model_name, mv.version).aliases)
    champ = champion(model_name)
    return {"model_name": model_name, "version": int(mv.version),
            "model_uri": f"models:/{model_name}/{mv.version}", "aliases": aliases,
            "gate_passed": not reasons, "gate_reasons": reasons, "run_id": run_id,
            "champion_version": int(champ.version) if champ else None}


def _set_alias(client, model_name: str, alias: str, version) -> None:
    """Set ``alias``; a writer elsewhere setting it at the same moment (another machine) makes the
    store's unique key fail once: then it is set again."""
    for attempt in range(3):
        try:
            client.set_registered_model_alias(model_name, alias, version)
            return
        except MlflowException as e:
            if attempt == 2 or not any(t in str(e) for t in ("UNIQUE constraint", "already exists",
                                                            "Duplicate entry", "duplicate key")):
                raise
            time.sleep(0.2 * (attempt + 1))


def _create_version_once(client, model_name, run_id, model_dir, metrics, reasons, tags, on_step,
                         base_model_revision=None):
    """(version, newest): the run's version, created unless it exists. Two registrations of one run
    that race past the lock (processes on other machines) both create; each then keeps the lowest
    version of the run and deletes its own if it is not that one, so exactly one remains."""
    mv = _version_of_run(model_name, run_id)
    if mv is None:
        model_dir = Path(model_dir)
        tags = dict(tags or {})
        if model_format(model_dir) == ADAPTER:
            adapter_tags = _adapter_tags(model_dir)
            tags.setdefault("base_model", adapter_tags.get("adapter_base_model"))
            tags.update(adapter_tags)
        else:
            tags["model_format"] = FULL
        model_uri, model_id = _log_hf_model(run_id, model_dir, base_model_revision)
        on_step("model-logged")
        try:
            client.create_registered_model(model_name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = client.create_model_version(model_name, source=model_uri, run_id=run_id,
                                         tags=_version_tags(run_id, metrics, reasons, tags),
                                         model_id=model_id)
        on_step("version-created")
        first = _version_of_run(model_name, run_id)
        if first is not None and int(first.version) < int(mv.version):
            client.delete_model_version(model_name, mv.version)
            mv = first
    # only set aliases if this is still the newest version
    latest = max(int(v.version) for v in client.search_model_versions(f"name = '{model_name}'"))
    return mv, int(mv.version) == latest


def _is_adapter_artifact(root: Path) -> bool:
    from mlflow.transformers.peft import _PEFT_ADAPTOR_DIR_NAME

    return (root / _PEFT_ADAPTOR_DIR_NAME / ADAPTER_CONFIG).is_file()


def _copy_full(root: Path, dst: Path) -> Path:
    """A downloaded full-model artifact as one Hugging Face folder: model/ + components/tokenizer/."""
    dst.mkdir(parents=True, exist_ok=True)
    for sub in (root / "model", root / "components" / "tokenizer"):
        if sub.is_dir():
            shutil.copytree(sub, dst, dirs_exist_ok=True)
    return dst


def download_hf_folder(model_uri: str, dst: str | Path, merge: bool = False) -> Path:
    """Download a registered model and lay it out as one Hugging Face folder at ``dst``
    (config, safetensors weights, tokenizer files, chat_template.jinja).

    A base + adapter version becomes an adapter folder as the train stage writes one: ``dst`` holds
    adapter_config.json, adapter_model.safetensors and the tokenizer, ``dst/base/`` the base model
    (its tokenizer included), and adapter_config.json's ``base_model_name_or_path`` is that folder,
    so ``AutoModelForCausalLM.from_pretrained(dst)`` (peft installed) or
    ``PeftModel.from_pretrained`` load base + adapter. ``merge=True``: the adapter merged into the
    base weights instead, written as a plain model folder (for consumers that take no adapters)."""
    from mlflow.transformers.peft import _PEFT_ADAPTOR_DIR_NAME

    dst = Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as tmp:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        if not _is_adapter_artifact(root):
            return _copy_full(root, dst)
        dst.mkdir(parents=True, exist_ok=True)
        tok_dir = root / "components" / "tokenizer"
        if merge:
            model, tokenizer = _load_adapter_artifact(root, merge=True)
            model.save_pretrained(dst, safe_serialization=True)
            tokenizer.save_pretrained(dst)
            return dst
        base = dst / "base"
        for sub in (root / "model", tok_dir):
            shutil.copytree(sub, base, dirs_exist_ok=True)
        for sub in (root / _PEFT_ADAPTOR_DIR_NAME, tok_dir):
            shutil.copytree(sub, dst, dirs_exist_ok=True)
    conf = json.loads((dst / ADAPTER_CONFIG).read_text())
    conf["base_model_name_or_path"] = str(base.resolve())
    conf.pop("revision", None)  # the base is that folder now
    (dst / ADAPTER_CONFIG).write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    return dst


def _load_adapter_artifact(root: Path, merge: bool = False):
    """(PeftModel, or the adapter merged into a plain model, tokenizer) from a downloaded
    base + adapter artifact (``model/``, ``peft/``, ``components/tokenizer/``)."""
    from mlflow.transformers.peft import _PEFT_ADAPTOR_DIR_NAME
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = root / _PEFT_ADAPTOR_DIR_NAME
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"registered adapter has no {ADAPTER_WEIGHTS} (safetensors only)")
    with LOAD_LOCK:
        base = AutoModelForCausalLM.from_pretrained(root / "model", use_safetensors=True,
                                                    trust_remote_code=False)
        model = PeftModel.from_pretrained(base, str(adapter))
    tokenizer = AutoTokenizer.from_pretrained(root / "components" / "tokenizer", trust_remote_code=False)
    return (model.merge_and_unload() if merge else model), tokenizer


def load_registered(model_uri: str, merge: bool = False):
    """(model, tokenizer) from a ``models:/name/version`` or ``models:/name@alias`` URI. A base +
    adapter version loads as a ``peft.PeftModel`` (the base with its adapter applied), or with
    ``merge=True`` as a plain model with the adapter merged into its weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        if _is_adapter_artifact(root):
            return _load_adapter_artifact(root, merge=merge)
        folder = _copy_full(root, Path(tmp) / "hf")
        with LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True,
                                                         trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    return model, tokenizer


# ------------------------------------------------------------------------------------- compare

def compare_runs(experiment: str, last: int = 10, metrics: list[str] | None = None,
                 params: list[str] | None = None, sweep: str | None = None):
    """One row per run of ``experiment`` (newest first) with key params, the latest value of each
    metric and the registered model versions (``name/version``) and aliases from that run. A sweep
    child run names its sweep (column ``sweep``: the parent run's name); the parent runs themselves
    (no training of their own) are left out. ``sweep`` (a parent run's name or id): that sweep's
    variants only, in variant order, with their overrides (``variant``), status and ``best``."""
    import pandas as pd

    metrics = list(metrics or DEFAULT_METRICS)
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    base = ["run_name", "run_id", "start_time", "status", "sweep"]
    tail = ["model_versions", "aliases"]
    if exp is None:
        return pd.DataFrame(columns=base + metrics + tail)
    parent = _sweep_parent(client, exp.experiment_id, sweep) if sweep else None
    if parent is not None:
        runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=1000, order_by=["attributes.start_time ASC"])
        runs = sorted(runs, key=lambda r: r.info.run_name or "")  # <sweep>-00, -01, ...
        base += ["variant", "sweep_status", "best"]
    else:
        runs, token = [], None
        while len(runs) < last:  # newest first, parents skipped
            page = client.search_runs([exp.experiment_id], max_results=max(last, 50),
                                      order_by=["attributes.start_time DESC"], page_token=token)
            runs += [r for r in page if r.data.tags.get("dpo.sweep") != "parent"]
            token = page.token
            if not token:
                break
        runs = runs[:last]
    parents = {}
    wanted = params or KEY_PARAMS
    param_cols = [p for p in wanted if any(p in r.data.params for r in runs)]
    rows = []
    for r in runs:
        # search results carry no aliases: fetch each version
        versions = [client.get_model_version(v.name, v.version)
                    for v in client.search_model_versions(f"run_id = '{r.info.run_id}'")]
        pid = r.data.tags.get("mlflow.parentRunId")
        if pid and pid not in parents:
            parents[pid] = client.get_run(pid)
        row = {"run_name": r.info.run_name, "run_id": r.info.run_id,
               "start_time": pd.to_datetime(r.info.start_time, unit="ms", utc=True),
               "status": r.info.status, "sweep": parents[pid].info.run_name if pid else ""}
        if parent is not None:
            prefix = "dpo.sweep."
            row["variant"] = ", ".join(f"{k[len(prefix):]}={v}" for k, v in sorted(r.data.tags.items())
                                       if k.startswith(prefix) and k[len(prefix):] not in ("status",))
            row["sweep_status"] = r.data.tags.get("dpo.sweep.status", "")
            row["best"] = "*" if parent.data.tags.get("dpo.sweep.best_run_id") == r.info.run_id else ""
        row.update({p: r.data.params.get(p) for p in param_cols})
        row.update({m: r.data.metrics.get(m) for m in metrics})
        row["model_versions"] = ", ".join(f"{v.name}/{v.version}" for v in versions)
        row["aliases"] = ", ".join(f"{v.name}@{a}" for v in versions for a in sorted(v.aliases))
        rows.append(row)
    return pd.DataFrame(rows, columns=base + param_cols + metrics + tail)


def _sweep_parent(client, experiment_id: str, sweep: str):
    """The parent run of sweep ``sweep`` (its run name or run id); ValueError naming the sweeps
    there are when none matches."""
    parents = client.search_runs([experiment_id], "tags.`dpo.sweep` = 'parent'", max_results=1000,
                                 order_by=["attributes.start_time DESC"])
    for r in parents:
        if sweep in (r.info.run_id, r.info.run_name):
            return r
    known = ", ".join(sorted({r.info.run_name for r in parents})) or "none"
    raise ValueError(f"no sweep {sweep!r} in this experiment (sweeps: {known})")
