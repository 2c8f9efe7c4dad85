"""Validation of preference data: each split is streamed, checked row by row, tokenized in batches
and written as valid.parquet / rejects.parquet / report.json / summary.md
(:func:`~data_contracts.validation.split.validate_split`). This package re-exports the names the
rest of the project imports."""

from data_contracts.validation.holdout import plan_splits, split_rows
from data_contracts.validation.reader import read_valid
from data_contracts.validation.report import check_not_empty
from data_contracts.validation.split import validate_split
from data_contracts.validation.streaming import SeenIds
from data_contracts.validation.workers import LARGE_INPUT_ROWS, resolve_num_proc

__all__ = ["LARGE_INPUT_ROWS", "SeenIds", "check_not_empty", "plan_splits", "read_valid", "resolve_num_proc", "split_rows",
           "validate_split"]
