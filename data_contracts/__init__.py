"""Data contracts: load preference data, check it row by row, tokenize it, write valid/rejects files.

Pure library: no Prefect, no training code. Main entry points:
``sources.load_rows``, ``validation.validate_split``, ``validation.split_rows``, ``builtin.judge``.
"""

from data_contracts.errors import DataError, DataPolicyError

__all__ = ["DataError", "DataPolicyError"]
