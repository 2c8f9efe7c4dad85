"""A real Prefect server for tests whose runs span processes (drills, task workers)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def prefect_server(home: Path, env: dict):
    """``prefect server start`` on 127.0.0.1 (own home and database under ``home``); yields its API
    URL; killed with its process group on exit."""
    port = free_port()
    env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_UI_ENABLED": "false", "HOME": str(home)})
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=open(home / "server.log", "wb"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-2000:]
            assert time.time() - t0 < 180, "Prefect server did not start"
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
