"""The user's own markets: one CSV or Parquet file per market, or a folder of them.

Columns: ``user`` and ``item`` (required, any ids), optional ``rating`` (number), ``timestamp`` (number of
seconds, or an ISO-8601 date/time string, converted to Unix seconds UTC) and ``text`` (item text; an item's
first non-empty text is used, later ones are ignored). Other columns are ignored.

* Without ``timestamp`` the file order is the time order (timestamp = 0-based row number), which is what
  leave-one-out then uses; a warning names the file, since time-based features (FedMM's item statistics, the
  popularity + recency floor) then measure file position.
* A folder holds one market per ``.csv``, ``.csv.gz``, ``.tsv`` or ``.parquet`` file, named by the file's
  stem, in name order; other files (a README) are ignored.
* CSV ids are read as text, so ``007`` stays ``007``; Parquet ids keep their type.
* Errors name the file and, for CSV, the 1-based line counting the header as line 1 (one line per record
  assumed); for Parquet, the 1-based row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedmarket.data._tables import first_bad, select_markets
from fedmarket.data.cache import cached_markets
from fedmarket.data.market import MarketData
from fedmarket.errors import DataError

log = logging.getLogger(__name__)

LOADER_VERSION = "2"  # 2: meta records where time comes from
SUFFIXES = (".csv.gz", ".csv", ".tsv", ".parquet")
REQUIRED = ("user", "item")
OPTIONAL = ("rating", "timestamp", "text")
MAX_ID_LENGTH = 1024  # characters of a user or item id


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def market_name(path: Path) -> str:
    """File name without its (possibly double) extension: ``de.csv.gz`` → ``de``."""
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


def market_files(path: str | Path) -> dict[str, Path]:
    """Market name → file, for a single file or a folder of files."""
    path = Path(path).expanduser()
    if path.is_file():
        if _suffix(path) is None:
            raise DataError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
        return {market_name(path): path}
    if not path.exists():
        raise DataError(f"market data path {str(path)!r} not found")
    files = sorted(
        (p for p in path.iterdir() if p.is_file() and _suffix(p) and not p.name.startswith(".")),
        key=lambda p: p.name,
    )
    if not files:
        raise DataError(f"{path}: folder has no market files ({', '.join(SUFFIXES)})")
    out: dict[str, Path] = {}
    for file in files:
        name = market_name(file)
        if name in out:
            raise DataError(f"{path}: market {name!r} has two files, {out[name].name} and {file.name}")
        out[name] = file
    return dict(sorted(out.items()))


def _read(path: Path) -> tuple[pd.DataFrame, str]:
    """The file as a frame plus the unit errors are reported in (``line`` for text, ``row`` for Parquet)."""
    suffix = _suffix(path)
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path), "row"
        columns = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", nrows=0).columns
        # ids and text as strings; numbers are converted below so that a bad value can be located
        frame = pd.read_csv(
            path,
            sep="\t" if suffix == ".tsv" else ",",
            dtype={c: str for c in columns},
            keep_default_na=False,
            na_values=[""],
            skip_blank_lines=False,
            index_col=False,  # a row with more fields than the header is an error, never an index
        )
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: {_decode_error_line(path, err)}") from None
    except (pd.errors.ParserError, ValueError, OSError) as err:
        raise DataError(f"{path}: cannot parse: {' '.join(str(err).split())}") from None
    blank = frame.isna().all(axis=1).to_numpy()
    return (frame[~blank] if blank.any() else frame), "line"


def _decode_error_line(path: Path, err: UnicodeDecodeError) -> str:
    """Where a file stops being UTF-8, as a line (pandas reports a position inside a buffer)."""
    import gzip

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                return f"line {number}: not UTF-8 text (byte {raw[bad.start]:#04x} at column {bad.start + 1})"
    return f"not UTF-8 text ({err.reason})"


def _check_cells(path: Path, frame: pd.DataFrame, unit: str) -> None:
    """Refuse what a Parquet file can hold but a market cannot: lists or other non-scalar cells, booleans
    as timestamps, and ids longer than `MAX_ID_LENGTH` characters."""
    for column in [c for c in (*REQUIRED, *OPTIONAL) if c in frame.columns]:
        values = frame[column]
        if values.dtype == object:
            nested = values.map(lambda v: isinstance(v, list | tuple | dict | set | np.ndarray)).to_numpy()
            if nested.any():
                kind = type(values.iloc[np.flatnonzero(nested)[0]]).__name__
                raise first_bad(
                    path,
                    frame,
                    nested,
                    f"column {column!r}: a {kind} (list or array) where one value is expected",
                    unit,
                )
        if column == "timestamp" and (
            pd.api.types.is_bool_dtype(values) or values.map(lambda v: isinstance(v, bool | np.bool_)).any()
        ):
            bad = values.map(lambda v: isinstance(v, bool | np.bool_)).to_numpy()
            raise first_bad(path, frame, bad, "column 'timestamp': a boolean is not a time", unit)
        if column in REQUIRED:
            long = values.astype(str).str.len().to_numpy() > MAX_ID_LENGTH
            if long.any():
                raise first_bad(
                    path,
                    frame,
                    long,
                    f"column {column!r}: an id longer than {MAX_ID_LENGTH} characters",
                    unit,
                )


def _numbers(path: Path, frame: pd.DataFrame, column: str, unit: str) -> np.ndarray:
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        value = frame[column].iloc[np.flatnonzero(bad)[0]]
        what = "missing value" if pd.isna(value) else f"{value!r} is not a number"
        raise first_bad(path, frame, bad, f"column {column!r}: {what}", unit)
    return values


def _timestamps(path: Path, frame: pd.DataFrame, unit: str) -> np.ndarray:
    """Numbers are Unix seconds; otherwise every value must be an ISO-8601 date/time (or a Parquet datetime)."""
    column = frame["timestamp"]
    missing = column.isna().to_numpy()
    if missing.any():
        raise first_bad(path, frame, missing, "column 'timestamp': missing value", unit)
    if pd.api.types.is_datetime64_any_dtype(column):
        parsed = pd.to_datetime(column, utc=True)
    elif pd.to_numeric(column, errors="coerce").notna().all():
        seconds = np.floor(_numbers(path, frame, "timestamp", unit))
        out_of_range = np.abs(seconds) > 2.0**62  # would not fit an int64 second count
        if out_of_range.any():
            value = column.iloc[np.flatnonzero(out_of_range)[0]]
            raise first_bad(path, frame, out_of_range, f"column 'timestamp': {value!r} is out of range", unit)
        return seconds.astype(np.int64)
    else:
        parsed = pd.to_datetime(column, errors="coerce", utc=True, format="ISO8601")
    bad = parsed.isna().to_numpy()
    if bad.any():
        value = column.iloc[np.flatnonzero(bad)[0]]
        numeric = pd.to_numeric(pd.Series([value]), errors="coerce").notna().iloc[0]
        what = (
            f"{value!r} is a number among dates (use one format for the whole column: Unix seconds or "
            "ISO-8601 dates)"
            if numeric
            else f"{value!r} is neither a number nor a date"
        )
        raise first_bad(path, frame, bad, f"column 'timestamp': {what}", unit)
    return ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


def parse_market_file(path: Path, name: str) -> MarketData:
    """One file → one market (see the module docstring for the columns)."""
    frame, unit = _read(path)
    for column in REQUIRED:
        if column not in frame.columns:
            raise DataError(f"{path}: missing column {column!r} (columns: {list(map(str, frame.columns))})")
    if frame.empty:
        raise DataError(f"{path}: market {name!r} has no interactions")
    frame = frame.reset_index(drop=True) if unit == "row" else frame
    _check_cells(path, frame, unit)
    for column in REQUIRED:
        missing = frame[column].isna().to_numpy()
        if missing.any():
            raise first_bad(path, frame, missing, f"column {column!r}: missing value", unit)
    ratings = _numbers(path, frame, "rating", unit) if "rating" in frame else None
    timestamps = (
        _timestamps(path, frame, unit) if "timestamp" in frame else np.arange(len(frame), dtype=np.int64)
    )
    market = MarketData.from_raw(
        name,
        frame["user"].to_numpy(dtype=object),
        frame["item"].to_numpy(dtype=object),
        timestamps,
        ratings=ratings,
        meta={
            "source": "generic",
            "file": path.name,
            "time": "timestamp" if "timestamp" in frame else "file row",
        },
    )
    if "text" in frame:
        texts = frame[["item", "text"]].dropna().drop_duplicates("item", keep="first")
        lookup = dict(zip(texts["item"].to_numpy(dtype=object), texts["text"].astype(str), strict=True))
        market.item_text = [lookup.get(item, "") for item in market.item_ids]
    return market


def load_generic(
    path: str | Path, markets: Sequence[str] | None = None, use_cache: bool = True
) -> dict[str, MarketData]:
    """Markets from the user's own files; ``path`` is a file or a folder (relative to the working directory)."""
    files = market_files(Path(path).expanduser().absolute())
    names = select_markets(markets, list(files), f"generic ({path})")
    out: dict[str, MarketData] = {}
    for name in names:
        file = files[name]
        out[name] = cached_markets(
            "generic",
            LOADER_VERSION,
            [file],
            {"market": name, "suffix": _suffix(file)},
            lambda file=file, name=name: {name: parse_market_file(file, name)},
            use_cache=use_cache,
        )[name]
        if out[name].meta.get("time") == "file row":
            log.warning(
                "%s: no 'timestamp' column; the file's row order is taken as time order (leave-one-out split, "
                "FedMM's first/median/last-seen statistics and the recency floor then measure file position)",
                file,
            )
    return out
