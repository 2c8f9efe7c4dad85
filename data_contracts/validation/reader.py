"""Read an earlier stage's ``valid.parquet`` (the validated split the engine trains on)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from data_contracts.errors import DataError


def read_valid(path: str | Path):
    """An earlier stage's ``valid.parquet`` as a DataFrame; a damaged or missing file is a one-line
    DataError naming it (re-run validate), not a pyarrow traceback."""
    import pandas as pd  # lazy: importing pandas costs start-up time, and only readers need it

    try:
        return pd.read_parquet(path)
    except (OSError, pa.ArrowException, ValueError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data error: {path} is missing or not a readable Parquet file ({why}); "
                        f"re-run the validate stage to rebuild it") from None
