"""Composition only: the ``dpo`` flow and the ``dpo`` command line."""

from data_contracts.state import apply_local_state_env

apply_local_state_env()  # before prefect is imported: keep its state under the project's home
