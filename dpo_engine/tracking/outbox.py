"""The outbox: writes to one MLflow run that survive an unreachable tracking store.

Training and evaluation write through an :class:`Outbox`: entries go to a JSONL file under
``state_home()/mlflow/outbox/`` first and are sent when the server answers (training never waits
for it); registration sends what is still pending, waiting for the server under the retry policy,
before it registers. An entry the store refuses for good (not an outage) is set aside with its
reason and said in one line, so it never blocks registration.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

import pandas as pd
from mlflow.entities import Metric

from data_contracts.helpers import file_lock, write_bytes
from data_contracts.state import state_home
from dpo_engine.tracking import client as tracking_client  # mlflow_client read per call: tests patch it
from dpo_engine.tracking.client import RetryPolicy, call, failure_reason, is_transient
from dpo_engine.tracking.runs import dataset_inputs, log_table


class Outbox:
    """Writes to one MLflow run that must not be lost while the tracking store is unreachable.

    Each entry (a metrics batch with its step and time stamp, an artifact file, a table, dataset
    inputs) is first
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

    def log_inputs(self, datasets: list[dict]) -> bool:
        """Dataset inputs of the run (descriptions as :func:`dpo_engine.tracking.datasets.split_inputs`
        makes them); sent again after a crash, MLflow adds nothing."""
        if datasets:
            self._append({"inputs": datasets})
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
            write_bytes(self.path, b"".join(line + b"\n" for line in kept))

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
        client = tracking_client.mlflow_client()
        done = 0
        while done < len(entries):
            n = 1
            if "metrics" in entries[done]:  # consecutive metric entries go as one batch
                while done + n < len(entries) and "metrics" in entries[done + n] and n < 900:
                    n += 1
            try:
                self._send_entries(client, entries[done:done + n])
            except Exception as e:  # noqa: BLE001 - an outage stops here; a refusal is set aside
                if is_transient(e):
                    raise
                self._set_aside(entries[done:done + n], e)
            done += n
            self._drop_sent(n)

    def _send_entries(self, client, group: list[dict]) -> None:
        """One artifact, table or dataset inputs entry, or a run of metric entries."""
        e = group[0]
        if "metrics" in e:
            batch = [Metric(k, v, m["ts"], m["step"]) for m in group for k, v in m["metrics"].items()]
            for i in range(0, len(batch), 1000):  # MLflow's limit per request
                client.log_batch(self.run_id, metrics=batch[i:i + 1000])
            return
        if "inputs" in e:
            client.log_inputs(self.run_id, datasets=dataset_inputs(e["inputs"]))
            return
        src = e.get("artifact") or e.get("table")
        if not Path(src).exists():  # said, not silently dropped
            self.log(f"outbox {self.path}: {src} no longer exists; not sent to MLflow")
        elif "artifact" in e:
            if Path(e["artifact"]).is_dir():
                client.log_artifacts(self.run_id, e["artifact"], e.get("artifact_path"))
            else:
                client.log_artifact(self.run_id, e["artifact"], e.get("artifact_path"))
        elif "table" in e:
            log_table(self.run_id, pd.read_json(e["table"], lines=True), e["artifact_file"])

    @property
    def set_aside_path(self) -> Path:
        return self.path.with_name(f"{self.run_id}.set-aside.jsonl")

    def _set_aside(self, group: list[dict], exc: BaseException) -> None:
        """Entries the store refused for good (not an outage: e.g. HTTP 413, an invalid request):
        kept in ``<run_id>.set-aside.jsonl`` with the reason, said in one line, never retried, so
        they cannot block registration."""
        reason = failure_reason(exc)
        with self._file_lock(), open(self.set_aside_path, "ab") as fh:
            for e in group:
                fh.write(json.dumps({"entry": e, "reason": reason}).encode() + b"\n")
        what = (f"{sum(len(e['metrics']) for e in group)} metric values" if "metrics" in group[0]
                else f"dataset inputs {', '.join(d['name'] for d in group[0]['inputs'])}"
                if "inputs" in group[0] else f"{group[0].get('artifact') or group[0].get('table')}")
        self.log(f"outbox {self.path}: MLflow refused {what} ({reason}); set aside in "
                 f"{self.set_aside_path}, not retried")

    def set_aside(self) -> list[dict]:
        """The entries set aside so far, with their reasons."""
        try:
            return [json.loads(line) for line in self.set_aside_path.read_bytes().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

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
            self.log(f"outbox {self.path}: sending failed ({failure_reason(e)}); entries kept for the "
                     "register stage")

    def _try_send(self, policy: RetryPolicy | None = None) -> bool:
        try:
            if not self._send_once(block=False):
                return False  # another sender holds the file: it sends these entries too
        except Exception as e:  # noqa: BLE001
            if not is_transient(e):
                raise
            policy = policy or tracking_client.default_policy()
            if self._wait is None:
                self.log(f"MLflow unavailable ({failure_reason(e)}); metrics kept in {self.path} and sent "
                         "when it answers")
            self._wait = policy.backoff_s if self._wait is None else min(self._wait * 2,
                                                                         policy.max_backoff_s)
            self._next_try = time.monotonic() + self._wait
            return False
        if self._wait is not None:
            self.log(f"MLflow reachable again: buffered entries of run {self.run_id} sent")
        self._wait = None
        return True

