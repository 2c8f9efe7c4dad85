"""Errors of the data layer: one line each, naming the path or row and what to do."""


class DataError(ValueError):
    """Bad or unreachable input data (missing file, unknown format, a bad row under policy=fail)."""


class DataPolicyError(DataError):
    """Too many rows were rejected under invalid_policy=quarantine (the files are written first)."""


# Exceptions that mean "the user must change something" (config, data, paths, servers), by class name
# so that every layer can recognise the others' without importing them. They are reported as one
# line, not a traceback, and a Prefect task does not retry them.
USER_ERROR_NAMES = frozenset({
    "ConfigError", "DataError", "DataPolicyError", "ModelError", "TrackingUnavailable", "CacheError",
    "EvaluationError", "TrainingError", "FileNotFoundError", "PrefectUnavailable", "LockKindError",
})


def user_error(exc: BaseException | None) -> BaseException | None:
    """The user error in ``exc`` or its cause/context chain, else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if type(exc).__name__ in USER_ERROR_NAMES:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
