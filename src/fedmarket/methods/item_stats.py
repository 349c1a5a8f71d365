"""Market-comparable item statistics from a market's own train interactions (FedMM's default RQ-VAE input,
and the ``model.item_features`` side information every CTR baseline may use, so baselines get the same side
information FedMM derives). No raw key is involved; nothing here leaves a market.

Without a timestamp column the loader's time is the row number in the file, so the three time statistics
become file-position statistics (the generic loader warns; see docs/protocol.md).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedmarket.data.split import MarketSplit

ITEM_STAT_NAMES = (
    "popularity",
    "rating_mean",
    "rating_std",
    "first_seen",
    "median_seen",
    "last_seen",
    "audience_activity",
)
_DAY = 86400.0
_CALENDAR_ORIGIN_DAYS = 16436.0  # 2015-01-01; a fixed calendar reference shared by every market


def item_statistics(split: MarketSplit, scaling: str = "calendar") -> np.ndarray:
    """Market-comparable item statistics from train interactions only, ``[num_items, 7]``: percentile of
    log popularity, rating mean and spread, the item's first / median / last interaction time, and the mean
    activity percentile of the item's audience. No raw key is involved.

    ``scaling="calendar"`` (default) keeps times on the shared calendar (years from 2015-01-01, /2) and uses
    fixed scales for every column, so a value means the same in every market: the same product tends to
    be reviewed at the same dates everywhere (analysis on XMarket: corr. 0.35-0.68 of first-review dates
    of shared ASINs between markets, against 0.08-0.54 for popularity percentiles).
    ``scaling="market"`` z-scores every column within the market and measures times as a fraction of
    the market's own time range (the first variant tried; it discards the shared calendar).
    """
    if scaling not in ("calendar", "market"):
        raise ValueError(f"scaling must be 'calendar' or 'market', got {scaling!r}")
    m = split.market
    items, users = split.train_items, split.train_users
    days = split.train_timestamps.astype(np.float64) / _DAY
    num_items = m.num_items
    index = range(num_items)
    counts = np.bincount(items, minlength=num_items).astype(np.float64)
    frame = pd.DataFrame({"item": items, "user": users, "t": days})
    if split.train_ratings is not None:
        frame["r"] = split.train_ratings
    cols = [pd.Series(np.log1p(counts)).rank(pct=True).to_numpy()]
    if "r" in frame:
        grouped = frame.groupby("item")["r"]
        mean = grouped.mean().reindex(index).fillna(frame["r"].mean()).to_numpy()
        std = grouped.std().reindex(index).fillna(0.0).to_numpy()
        cols += [(mean - 4.0), std]
    else:  # no ratings in this market (e.g. es): neutral constants
        cols += [np.zeros(num_items), np.zeros(num_items)]
    # Items with no train interaction get the market's *first* day. Not its last: in a leave-one-out
    # benchmark such items exist only because of held-out interactions, so calling them "new" would hand
    # the model the protocol (in jp, 24% of test positives against 14% of negatives have no train row).
    t_first, t_last = frame["t"].min(), frame["t"].max()
    by_item = frame.groupby("item")["t"]
    times = [
        agg().reindex(index).fillna(t_first).to_numpy() for agg in (by_item.min, by_item.median, by_item.max)
    ]
    if scaling == "market":
        times = [(t - t_first) / max(t_last - t_first, 1.0) for t in times]
    else:
        times = [(t - _CALENDAR_ORIGIN_DAYS) / (2 * 365.0) for t in times]
    cols += times
    user_pct = pd.Series(np.bincount(users, minlength=m.num_users)).rank(pct=True).to_numpy()
    frame["activity"] = user_pct[users]
    cols.append(frame.groupby("item")["activity"].mean().reindex(index).fillna(0.5).to_numpy())
    stats = np.stack(cols, axis=1)
    if scaling == "market":
        return ((stats - stats.mean(0)) / np.maximum(stats.std(0), 1e-6)).astype(np.float32)
    # percentiles in [0, 1] → unit variance around 0; rating and time columns are already on fixed scales
    for j in (0, 6):
        stats[:, j] = (stats[:, j] - 0.5) * np.sqrt(12.0)
    return stats.astype(np.float32)


def item_stat_buckets(split: MarketSplit, buckets: int = 10) -> dict[str, tuple[np.ndarray, int]]:
    """``item_statistics`` bucketised: per statistic, the quantile bucket (over the market's items with a
    train interaction) of every item, as categorical fields ``stat_<name>`` with ``buckets + 1`` codes; code
    ``buckets`` is reserved for items without a train interaction (they never reach the main metrics under
    protocol 2). The form `CTRData.from_split` takes as ``extra_item_fields``."""
    stats = item_statistics(split, "market").astype(np.float64)
    warm = np.bincount(split.train_items, minlength=split.market.num_items) > 0
    out = {}
    for j, name in enumerate(ITEM_STAT_NAMES):
        col = stats[:, j]
        edges = np.unique(np.quantile(col[warm], np.linspace(0, 1, buckets + 1)[1:-1])) if warm.any() else []
        codes = np.searchsorted(edges, col, side="right").astype(np.int64)
        codes[~warm] = buckets
        out[f"stat_{name}"] = (codes, buckets + 1)
    return out


def item_stat_dense(split: MarketSplit) -> dict[str, tuple[np.ndarray, int]]:
    """``item_statistics`` as numeric fields ``num_stat_<name>`` (z-scored within the market; each enters
    the model as value · v_f, `fedmarket.models.ctr.NUMERIC_PREFIX`), in the form `CTRData.from_split`
    takes as ``extra_item_fields``. Items without a train interaction get the fill values of
    `item_statistics` (they never reach the main metrics under protocol 2)."""
    from fedmarket.models.ctr import to_fixed_point

    stats = item_statistics(split, "market")
    return {f"num_stat_{name}": (to_fixed_point(stats[:, j]), 1) for j, name in enumerate(ITEM_STAT_NAMES)}
