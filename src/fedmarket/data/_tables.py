"""Reading delimited interaction files fast, and failing with the file and line that is wrong.

Every real loader goes through :func:`read_table`: pandas' C parser with explicit dtypes (ML-1M's million
rows parse in about half a second), and only when that fails a slower second pass that finds the offending
line, because "could not convert string to float" without a file and a line number is useless to a user.

Line numbers are 1-based and count the header as line 1, so the first data row is line 2 (what an editor
shows). Blank lines are kept while parsing (``skip_blank_lines=False``) so that row ``i`` of the frame is
always line ``i + 2``, and dropped afterwards.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedmarket.data.paths import require_file
from fedmarket.errors import DataError

# kinds of columns read_table understands
STR, FLOAT = "str", "float"

_FIELDS_RE = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")


def plain_name(header_field: str) -> str:
    """``user_id:token`` → ``user_id`` (RecBole atomic files type their header fields)."""
    return header_field.strip().lstrip("\ufeff").split(":", 1)[0]


def read_header(path: Path, sep: str) -> list[str]:
    """The raw header fields of ``path`` (with any ``:type`` suffix still on)."""
    with open(path, encoding="utf-8", newline="") as handle:
        first = handle.readline()
    if not first.strip():
        raise DataError(f"{path}: empty file or empty header line (line 1)")
    return [field.strip().lstrip("\ufeff") for field in first.rstrip("\r\n").split(sep)]


def line_number(index_label: int) -> int:
    """File line of the frame row labelled ``index_label`` (header = line 1)."""
    return int(index_label) + 2


def first_bad(
    path: Path, frame: pd.DataFrame, bad: np.ndarray, message: str, unit: str = "line"
) -> DataError:
    """A DataError for the first row where ``bad`` is true: ``<file>: line <n>: <message>``."""
    label = frame.index[np.flatnonzero(bad)[0]]
    where = line_number(label) if unit == "line" else int(label) + 1
    return DataError(f"{path}: {unit} {where}: {message}")


def read_table(
    path: Path,
    sep: str,
    columns: Mapping[str, str],
    optional: Iterable[str] = (),
    quoting: int = csv.QUOTE_NONE,
    market: str | None = None,
) -> pd.DataFrame:
    """Read a delimited file with a header into a frame with plain column names.

    Args:
        path: the file.
        sep: field separator (RecBole: tab; FOREC: a single space).
        columns: required columns, plain name → kind (``"str"`` or ``"float"``).
        optional: further columns (plain names) read as ``"str"`` when present.
        quoting: ``csv.QUOTE_NONE`` by default because movie titles contain quotes and commas.
        market: the market the file holds, named in the error when it has no rows.

    Returns a frame with the required columns plus any optional ones present, blank lines dropped, and the
    index left as parsed (row label ``i`` is file line ``i + 2``).
    """
    require_file(path)
    header = read_header(path, sep)
    plain = [plain_name(h) for h in header]
    if len(set(plain)) != len(plain):
        dup = next(p for p in plain if plain.count(p) > 1)
        raise DataError(f"{path}: column {dup!r} appears twice in the header (line 1)")
    for name in columns:
        if name not in plain:
            raise DataError(f"{path}: missing column {name!r} (header has {plain})")
    optional = [name for name in optional if name in plain]
    kinds = {name: columns.get(name, STR) for name in plain}
    dtypes = {raw: (np.float64 if kinds[p] == FLOAT else str) for raw, p in zip(header, plain, strict=True)}
    read_kwargs = dict(
        sep=sep,
        header=0,
        names=header,
        quoting=quoting,
        engine="c",
        skip_blank_lines=False,
        keep_default_na=False,
        na_values=[""],
        encoding="utf-8",
    )
    try:
        frame = pd.read_csv(path, dtype=dtypes, **read_kwargs)
    except pd.errors.ParserError as err:
        match = _FIELDS_RE.search(str(err))
        if match:
            expected, line, saw = match.groups()
            raise DataError(f"{path}: line {line}: expected {expected} fields, found {saw}") from None
        raise DataError(f"{path}: cannot parse: {err}") from None
    except ValueError:
        # a non-numeric value in a float column: read everything as text to find where
        frame = pd.read_csv(path, dtype=str, **read_kwargs)
        _raise_first_non_numeric(path, frame, header, plain, kinds)
        raise  # unreachable unless pandas and to_numeric disagree
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    frame.columns = plain
    frame = frame[list(columns) + optional]
    blank = frame.isna().all(axis=1).to_numpy()
    if blank.any():
        frame = frame[~blank]
    missing = frame[list(columns)].isna().to_numpy()
    if missing.any():
        row, col = np.argwhere(missing)[0]
        label = frame.index[row]
        name = list(columns)[col]
        raise DataError(
            f"{path}: line {line_number(label)}: no value for column {name!r} "
            f"(expected {len(header)} {_sep_name(sep)}-separated fields)"
        )
    if frame.empty:
        what = f"market {market!r} has no interactions" if market else "no data rows"
        raise DataError(f"{path}: {what} (nothing after the header)")
    return frame


def _raise_first_non_numeric(
    path: Path, frame: pd.DataFrame, header: list[str], plain: list[str], kinds: Mapping[str, str]
) -> None:
    for raw, name in zip(header, plain, strict=True):
        if kinds[name] != FLOAT:
            continue
        text = frame[raw]
        numbers = pd.to_numeric(text, errors="coerce")
        bad = (text.notna() & numbers.isna()).to_numpy()
        if bad.any():
            value = text.iloc[np.flatnonzero(bad)[0]]
            raise first_bad(path, frame, bad, f"column {name!r}: {value!r} is not a number")


def _sep_name(sep: str) -> str:
    return {"\t": "tab", " ": "space", ",": "comma"}.get(sep, repr(sep))


def whole_seconds(path: Path, frame: pd.DataFrame, column: str) -> np.ndarray:
    """A float column of Unix seconds as int64, refusing NaN/inf (a row the parser could not fill)."""
    values = frame[column].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise first_bad(path, frame, bad, f"column {column!r}: not a finite number")
    return np.floor(values).astype(np.int64)


def dates_to_seconds(path: Path, frame: pd.DataFrame, column: str, fmt: str = "%Y-%m-%d") -> np.ndarray:
    """Date strings → Unix seconds of midnight UTC, naming the first line that does not parse."""
    text = frame[column]
    parsed = pd.to_datetime(text, format=fmt, errors="coerce", utc=True)
    bad = parsed.isna().to_numpy()
    if bad.any():
        value = text.iloc[np.flatnonzero(bad)[0]]
        raise first_bad(path, frame, bad, f"column {column!r}: {value!r} is not a date like 2020-01-31")
    # pandas 3 may pick a unit other than ns: divide timedeltas rather than reinterpret the integers
    return ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.int64)


def select_markets(markets: Sequence[str] | str | None, valid: Sequence[str], dataset: str) -> list[str]:
    """The requested market names in the requested order (all of ``valid`` for None), refusing unknown or
    repeated names with the list of valid ones."""
    if markets is None:
        return list(valid)
    if isinstance(markets, str):
        markets = [markets]
    markets = list(markets)
    if not markets:
        raise DataError(f"dataset {dataset!r}: empty market list; valid markets: {', '.join(valid)}")
    for name in markets:
        if name not in valid:
            raise DataError(f"dataset {dataset!r} has no market {name!r}; valid markets: {', '.join(valid)}")
    if len(set(markets)) != len(markets):
        raise DataError(f"dataset {dataset!r}: market list {markets} repeats a name")
    return markets
