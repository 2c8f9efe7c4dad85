"""Where the project keeps its state: the state home ($DPO_HOME, else <checkout>/.dpo), the MLflow
store inside it, and the environment that keeps Prefect, Hugging Face and matplotlib state there
(nothing is written to $HOME)."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path | None:
    """The source checkout this package runs from, if any (holds pyproject.toml)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def state_home() -> Path:
    """Where Prefect, MLflow, caches and runs live: $DPO_HOME, else <checkout>/.dpo, else ./.dpo.
    Created owner-only (0700) when missing: it holds the MLflow and Prefect databases, result
    records and the outbox, which may carry credentials; an existing folder is left as it is."""
    env = os.environ.get("DPO_HOME")
    if env:
        home = Path(env).expanduser().resolve()
    else:
        root = project_root()
        home = (root if root is not None else Path.cwd()) / ".dpo"
    if not home.is_dir():
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(home, 0o700)  # mkdir's mode is masked by the umask
    return home


def mlflow_uri(cfg=None) -> str:
    """The tracking URI: ``cfg.tracking.mlflow_tracking_uri``, else $MLFLOW_TRACKING_URI, else the
    SQLite store under the state home."""
    if cfg is not None and cfg.tracking.mlflow_tracking_uri:
        return cfg.tracking.mlflow_tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{state_home() / 'mlflow' / 'mlflow.db'}"  # absolute path -> four slashes


def local_state_env() -> dict[str, str]:
    """Environment that keeps Prefect, Hugging Face and MLflow state under the state home.
    Apply with ``os.environ.setdefault`` before importing prefect: explicit settings win."""
    home = state_home()
    return {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "prefect" / "results"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",  # never pickle (tasks/results.py refuses it on read)
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
        # the temporary API of a plain `dpo run` gets 3 minutes to start, not Prefect's 20 s: on a busy
        # 2-core machine it took longer and the run died with "Timed out ... ephemeral Prefect API server"
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "HF_HOME": str(home / "hf"),
        "HF_DATASETS_CACHE": str(home / "hf" / "datasets"),
        "MPLCONFIGDIR": str(home / "matplotlib"),
        "GIT_PYTHON_REFRESH": "quiet",
    }


def apply_local_state_env() -> None:
    for k, v in local_state_env().items():
        os.environ.setdefault(k, v)
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
