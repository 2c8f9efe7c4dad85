"""The Prefect API the flows talk to: a check that a configured server answers, the local server
``dpo serve`` starts (bound to 127.0.0.1), and the shared server that sweep workers need."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from data_contracts.config import ConfigError


class PrefectUnavailable(RuntimeError):
    pass


def check_prefect_api(timeout: float = 5.0) -> None:
    """With PREFECT_API_URL set, the server must answer; without it a temporary local API is used."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout):
            pass
    except Exception as e:  # noqa: BLE001 - any failure means unreachable
        raise PrefectUnavailable(f"cannot reach the Prefect API at {url} ({getattr(e, 'reason', e)}); "
                                 "start it (prefect server start --host 127.0.0.1) or unset PREFECT_API_URL") from None


def start_local_server(port: int) -> subprocess.Popen:
    """A Prefect server on 127.0.0.1:port (state under PREFECT_HOME), returned once healthy."""
    log = Path(os.environ["PREFECT_HOME"]) / "server.log"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(120):
        if proc.poll() is not None:
            raise PrefectUnavailable(f"the Prefect server exited (code {proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise PrefectUnavailable(f"the Prefect server did not answer on {url} within 120 s; see {log}")


def require_prefect_server(what: str) -> None:
    """Task workers and the flows that feed them must share one Prefect server (not a temporary one)."""
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(f"{what} needs a Prefect server shared with the sweep: set PREFECT_API_URL "
                          "(e.g. http://127.0.0.1:4200/api, the server `dpo serve` starts)")
    check_prefect_api()
