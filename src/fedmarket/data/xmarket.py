"""XMarket (XMRec) Electronics: the 7 FOREC markets plus Spain from CAT-SR, and XMarket item metadata.

Sources (see ``xmrec-forec/SOURCE.md`` and ``xmrec-catsr-es/SOURCE.md``):

* ``xmrec-forec/{market}_5core.txt``: space-separated, header ``userId itemId rate date``, stars 1-5,
  dates ``YYYY-MM-DD`` (converted to Unix seconds of midnight UTC, the same convention as ``es.inter``);
* ``xmrec-catsr-es/es.inter``: RecBole atomic file, ``user_id:token item_id:token timestamp:float``, no
  rating, so the ``es`` market has ``ratings=None``.

Raw item ids are ASINs, shared across markets; they are kept only for analysis and not-private baselines
(METHODS.md, "Common protocol"). Raw user ids are reviewer ids. There are no side features.

No XMarket item text is staged here; :func:`load_xmarket_metadata` and :func:`attach_item_text` read the
original XMarket metadata JSON lines where a user has them (``metadata`` option of :func:`load_xmrec`).
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedmarket.data._tables import (
    FLOAT,
    STR,
    dates_to_seconds,
    first_bad,
    read_table,
    select_markets,
    whole_seconds,
)
from fedmarket.data.cache import cached_markets
from fedmarket.data.market import MarketData
from fedmarket.data.paths import require_file, resolve_data_dir
from fedmarket.errors import DataError

LOADER_VERSION = "1"
FOREC_MARKETS = ("ca", "de", "fr", "in", "jp", "mx", "uk")
XMREC_MARKETS = (*FOREC_MARKETS, "es")


def market_file(data_dir: Path, market: str) -> Path:
    """The source file of one XMarket market."""
    if market == "es":
        return data_dir / "xmrec-catsr-es" / "es.inter"
    return data_dir / "xmrec-forec" / f"{market}_5core.txt"


def parse_forec_file(path: Path, market: str) -> MarketData:
    """One FOREC ``*_5core.txt`` file → a market (stars as ratings, dates as Unix seconds)."""
    frame = read_table(
        path, sep=" ", columns={"userId": STR, "itemId": STR, "rate": FLOAT, "date": STR}, market=market
    )
    return MarketData.from_raw(
        market,
        frame["userId"].to_numpy(dtype=object),
        frame["itemId"].to_numpy(dtype=object),
        dates_to_seconds(path, frame, "date"),
        ratings=frame["rate"].to_numpy(),
        meta={"source": "xmrec-forec", "file": path.name},
    )


def parse_recbole_inter(path: Path, market: str) -> MarketData:
    """A RecBole ``.inter`` file with user, item, timestamp and optional rating → a market."""
    frame = read_table(
        path,
        sep="\t",
        columns={"user_id": STR, "item_id": STR, "timestamp": FLOAT},
        optional=["rating"],
        market=market,
    )
    ratings = None
    if "rating" in frame:
        ratings = pd.to_numeric(frame["rating"], errors="coerce").to_numpy()
        if pd.isna(ratings).any():
            raise first_bad(path, frame, pd.isna(ratings), "column 'rating': missing or not a number")
    return MarketData.from_raw(
        market,
        frame["user_id"].to_numpy(dtype=object),
        frame["item_id"].to_numpy(dtype=object),
        whole_seconds(path, frame, "timestamp"),
        ratings=ratings,
        meta={"source": "xmrec-catsr-es", "file": path.name},
    )


def load_xmrec(
    data_dir: str | Path | None = None,
    markets: Sequence[str] | None = None,
    use_cache: bool = True,
    metadata: str | Path | None = None,
) -> dict[str, MarketData]:
    """The ``xmrec`` dataset: markets ca, de, fr, in, jp, mx, uk, es (or the ``markets`` asked for, in that order).

    Each market file is cached on its own, so a subset costs only its own files.
    ``metadata``: optional XMarket metadata (see :func:`metadata_for_market`) to attach as ``item_text``.
    """
    names = select_markets(markets, XMREC_MARKETS, "xmrec")
    root = resolve_data_dir(data_dir)
    out: dict[str, MarketData] = {}
    for name in names:
        path = require_file(market_file(root, name))
        parse = parse_recbole_inter if name == "es" else parse_forec_file
        loaded = cached_markets(
            "xmrec",
            LOADER_VERSION,
            [path],
            {"market": name},
            lambda parse=parse, path=path, name=name: {name: parse(path, name)},
            use_cache=use_cache,
        )
        out[name] = loaded[name]
    if metadata is not None:
        for name in names:
            meta_file = metadata_for_market(metadata, name)
            if meta_file is not None:
                out[name] = attach_item_text(out[name], load_xmarket_metadata(meta_file))
    return out


# ---------------------------------------------------------------- metadata (item text)


def metadata_for_market(metadata: str | Path, market: str) -> Path | None:
    """The metadata file for ``market``: ``metadata`` itself if it is a file; in a folder, XMarket's own name
    ``metadata_{market}_*.json[.gz]`` (titles are in the market's language), or None if there is none."""
    path = Path(metadata).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"metadata path {str(path)!r} not found")
    found = sorted(
        p for p in path.glob(f"metadata_{market}_*") if p.name.endswith((".json", ".json.gz", ".jsonl"))
    )
    return found[0] if found else None


def _categories_text(categories: Any) -> str:
    """XMarket categories are one path (``[a, b]``) or several (``[[a, b], [a, c]]``): paths joined by
    ``; ``, levels by `` > ``."""
    if not categories:
        return ""
    if isinstance(categories, str):
        return categories
    paths = categories if all(isinstance(c, list | tuple) for c in categories) else [categories]
    return "; ".join(" > ".join(str(level) for level in p if str(level)) for p in paths if p)


def item_text_from_record(record: Mapping[str, Any]) -> str:
    """``"title. cat1 > cat2"``; either part may be missing (then the text is the other part alone)."""
    title = str(record.get("title") or "").strip()
    categories = _categories_text(record.get("categories") or record.get("category"))
    if title and categories:
        return f"{title}. {categories}"
    return title or categories


def load_xmarket_metadata(path: str | Path) -> dict[str, str]:
    """XMarket metadata JSON lines (optionally gzipped) → ``{asin: text}``.

    One object per line with ``asin``, ``title`` and ``categories``. Lines that are Python literals rather than
    JSON (as in some Amazon metadata dumps) are accepted too. A line that is neither, or has no ``asin``, is a
    DataError naming the file and the 1-based line. When an ASIN repeats, the first record wins.
    """
    path = require_file(Path(path))
    opener = gzip.open if path.name.endswith(".gz") else open
    texts: dict[str, str] = {}
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    try:
                        record = ast.literal_eval(line.strip())
                    except (ValueError, SyntaxError):
                        raise DataError(f"{path}: line {line_no}: not a JSON object") from None
                if not isinstance(record, dict) or not record.get("asin"):
                    raise DataError(f"{path}: line {line_no}: record has no 'asin'")
                texts.setdefault(str(record["asin"]), item_text_from_record(record))
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise DataError(f"{path}: cannot read metadata ({err})") from None
    return texts


def attach_item_text(market: MarketData, asin_to_text: Mapping[str, str]) -> MarketData:
    """A copy of ``market`` with ``item_text`` looked up by raw item id (ASIN).

    Items without metadata get the empty string: a placeholder such as the ASIN would let a text encoder
    match items across markets by their private key, which a federated method must not do. The share of
    items with text is recorded in ``meta["item_text_coverage"]`` so a run can report it.
    """
    texts = [asin_to_text.get(str(asin), "") for asin in market.item_ids]
    covered = sum(1 for t in texts if t) / max(1, len(texts))
    return dataclasses.replace(market, item_text=texts, meta={**market.meta, "item_text_coverage": covered})
