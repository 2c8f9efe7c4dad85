"""Errors of the data layer: one line each, naming the path or row and what to do."""


class DataError(ValueError):
    """Bad or unreachable input data (missing file, unknown format, a bad row under policy=fail)."""


class DataPolicyError(DataError):
    """Too many rows were rejected under invalid_policy=quarantine (the files are written first)."""
