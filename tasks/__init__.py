"""Thin Prefect tasks, one per stage: retries, content cache keys, artifacts. Logic lives in dpo_engine."""

from data_contracts.state import apply_local_state_env

apply_local_state_env()  # before prefect is imported: keep its state under the project's home

from tasks import results  # noqa: E402  (after the environment: imports prefect)

results.install()  # result records are read as JSON only, never unpickled
