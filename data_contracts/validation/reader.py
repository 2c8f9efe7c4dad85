"""Read an earlier stage's ``valid.parquet`` (the validated split the engine trains on)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_contracts.errors import DataError
from data_contracts.helpers import sha256_file
from data_contracts.images import resolve_refs


def _check_recorded_hash(path: Path) -> None:
    """The file's sha256 against the one its split's report.json recorded when it was written (a
    byte flipped on disk would otherwise be read as other token ids)."""
    try:
        recorded = json.loads((path.parent / "report.json").read_text()).get("valid_sha256")
    except (OSError, ValueError):
        return  # no report beside it (a file of an older version, or copied alone): read as it is
    if recorded and path.is_file() and sha256_file(path) != recorded:
        raise DataError(f"data error: {path} differs from what validation wrote (its sha256 does not match "
                        f"the one in report.json): damaged on disk; re-run the validate stage to rebuild it")


def read_valid(path: str | Path, columns: list[str] | None = None):
    """An earlier stage's ``valid.parquet`` as a DataFrame, checked against the sha256 its report.json
    recorded; a damaged or missing file is a one-line
    DataError naming it (re-run validate), not a pyarrow traceback. Image references come with
    absolute paths (into the split folder's image store). ``columns``: read only these (those of them
    the file has), e.g. the token ids without the texts."""
    import pandas as pd  # lazy: importing pandas costs start-up time, and only readers need it

    _check_recorded_hash(Path(path))
    try:
        if columns is not None:  # only those the file has (images: only a vision split's)
            names = set(pq.read_schema(path).names)
            columns = [c for c in columns if c in names]
        df = pd.read_parquet(path, columns=columns)
    except (OSError, pa.ArrowException, ValueError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data error: {path} is missing or not a readable Parquet file ({why}); "
                        f"re-run the validate stage to rebuild it") from None
    if "images" in df.columns and df["images"].notna().any():  # references relative to the split folder
        root = Path(path).parent
        df["images"] = df["images"].map(lambda v: resolve_refs(v, root))
    return df
