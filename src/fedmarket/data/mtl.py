"""Multi-scenario multi-task data (PF-MSMTrec): impressions with a click and a conversion label per row.

`MarketData` is interaction-based (one row = one positive); a multi-task CTR/CTCVR scenario needs every
*impression* with two labels and per-row features, so this module has its own container, `MTLMarket`
(one per scenario = one federated client), and its own split, `split_impressions`.

Sources (DATA.md):

* ``ml1m-proxy-age`` / ``ml1m-proxy-zip``: the **labelled ML-1M proxy** (never AliExpress). Per scenario,
  impressions = the user's rated movies plus ``negatives_per_positive`` (2) unrated movies per rated one,
  drawn without replacement in proportion to the movie's popularity in that scenario (Gumbel top-k), each
  time-stamped with the timestamp of a random rating of the same user; click = rated, conversion = rated
  5 stars, CTCVR = click · conversion. Features: user ID, item ID (scenario-local, never shared), gender,
  occupation, first and second genre, 5-year release bucket (public fixed vocabularies, the same codes in
  every scenario), and age in the zip split only: the scenario attribute itself is dropped (age group in
  the age split; the zip code is never a feature). Scenario = ML-1M age group (7, heterogeneous: the main
  benchmark) or first zip digit (10, near-homogeneous: the control). Cached as ``.npz`` keyed by the
  source files' digests and the options.
* ``aliexpress``: the real AliExpress CSV layout (``search_id``, ``categorical_1..16``, ``numerical_1..63``,
  ``click``, ``conversion``), one country = one scenario, either the Tianchi/MTReclib folder layout
  ``AliExpress_<CC>/{train,test}.csv`` or one folder of ``*train*.csv`` / ``*test*.csv`` files (the
  ``mtl-samples/aliexpress`` fixture, 120 rows: schema only, never a quality result).
* ``aliccp``: the Ali-CCP CSV layout of torch-rechub (``click``, ``purchase``, sparse field ids, dense
  ``D*`` fields); the scenario is field ``301`` and is dropped from the inputs. Files ``*train*``,
  ``*val*``, ``*test*`` keep their roles.
* ``synthetic-mtl``: the synthetic generator (``task_conflict`` knob) turned into impressions exactly like
  the proxy (conversion = rating 5).

Field names say what may be shared: ``id_*`` fields are scenario-local ID spaces (their embeddings never
leave a client); ``feat_*`` fields use a fixed public vocabulary with the same size in every scenario.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmarket.data import movielens, synthetic
from fedmarket.data._tables import select_markets
from fedmarket.data.cache import cache_key, resolve_cache_dir
from fedmarket.data.market import MarketData
from fedmarket.data.paths import resolve_data_dir
from fedmarket.data.seeds import market_seed
from fedmarket.errors import DataError

PROXY_VERSION = "1"
FOLD_TRAIN, FOLD_VALID, FOLD_TEST = 0, 1, 2

ALIEXPRESS_CATEGORICAL = tuple(f"categorical_{i}" for i in range(1, 17))
ALIEXPRESS_NUMERICAL = tuple(f"numerical_{i}" for i in range(1, 64))
ALIEXPRESS_COLUMNS = ("search_id", *ALIEXPRESS_CATEGORICAL, *ALIEXPRESS_NUMERICAL, "click", "conversion")
ALICCP_SCENARIO_FIELD = "301"
ALICCP_LABELS = ("click", "purchase")


@dataclass
class MTLMarket:
    """One scenario's impressions (one row = one impression), in source (or time) order.

    Attributes:
        name: scenario name (e.g. ``"age18"``).
        sparse: int64 ``[N, F]`` categorical codes, column ``f`` in ``[0, sparse_fields[f])``.
        sparse_fields: field name → vocabulary size, in column order (``id_*`` local, ``feat_*`` public).
        dense: float32 ``[N, D]`` numerical features (``D`` may be 0).
        click, conversion: float32 0/1 per impression; CTCVR label = click · conversion.
        groups: int64 user (or search session) per impression, or None; the split keeps each group's time
            order.
        timestamps: int64 per impression, or None.
        fold: predefined split per impression (0 train, 1 valid, 2 test), or None.
    """

    name: str
    sparse: np.ndarray
    sparse_fields: dict[str, int]
    dense: np.ndarray
    click: np.ndarray
    conversion: np.ndarray
    groups: np.ndarray | None = None
    timestamps: np.ndarray | None = None
    fold: np.ndarray | None = None
    dense_fields: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.click)
        if n == 0:
            raise DataError(f"scenario {self.name!r} has no impressions")
        self.sparse = np.asarray(self.sparse, dtype=np.int64).reshape(n, -1)
        self.dense = np.asarray(self.dense, dtype=np.float32).reshape(n, -1)
        self.click = np.asarray(self.click, dtype=np.float32)
        self.conversion = np.asarray(self.conversion, dtype=np.float32)
        if self.sparse.shape[1] != len(self.sparse_fields):
            raise DataError(
                f"scenario {self.name!r}: {self.sparse.shape[1]} sparse columns, {len(self.sparse_fields)} fields"
            )
        for col, (fname, vocab) in enumerate(self.sparse_fields.items()):
            values = self.sparse[:, col]
            if values.min() < 0 or values.max() >= vocab:
                raise DataError(f"scenario {self.name!r}: field {fname!r} has codes outside [0, {vocab})")
        for label in ("click", "conversion"):
            values = getattr(self, label)
            if not np.isin(values, (0.0, 1.0)).all():
                raise DataError(f"scenario {self.name!r}: {label} labels must be 0/1")
        for attr in ("groups", "timestamps", "fold"):
            values = getattr(self, attr)
            if values is not None:
                values = np.asarray(values, dtype=np.int64)
                if len(values) != n:
                    raise DataError(f"scenario {self.name!r}: {attr} has {len(values)} rows, labels {n}")
                setattr(self, attr, values)

    @property
    def ctcvr(self) -> np.ndarray:
        return self.click * self.conversion

    @property
    def num_interactions(self) -> int:
        return len(self.click)

    def summary(self) -> dict:
        return {
            "market": self.name,
            "impressions": self.num_interactions,
            "users": int(len(np.unique(self.groups))) if self.groups is not None else -1,
            "ctr": float(self.click.mean()),
            "ctcvr": float(self.ctcvr.mean()),
            "cvr_given_click": float(self.ctcvr.sum() / max(1.0, self.click.sum())),
        }


ITEM_FIELDS = ("id_item", "feat_205")
"""Sparse fields that name the item of an impression (the proxy and synthetic scenarios; Ali-CCP's ``205``);
``meta["item_field"]`` names another."""


def item_field(market: MTLMarket) -> str | None:
    """The sparse field holding the item of each impression, or None (then no impression is cold)."""
    named = market.meta.get("item_field")
    if named is not None:
        if named not in market.sparse_fields:
            raise DataError(f"scenario {market.name!r}: item_field {named!r} is not one of its sparse fields")
        return str(named)
    return next((f for f in ITEM_FIELDS if f in market.sparse_fields), None)


_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass
class MTLSplit:
    """Train / valid / test row indices of one scenario (the multi-task analogue of `MarketSplit`).

    Under protocol 2 (docs/protocol.md) ``valid_index`` / ``test_index`` hold only impressions of items with a
    train impression in the scenario; the others are ``cold_valid_index`` / ``cold_test_index`` (the
    cold-item report)."""

    market: MTLMarket
    train_index: np.ndarray
    valid_index: np.ndarray
    test_index: np.ndarray
    protocol: int = 2
    cold_valid_index: np.ndarray = field(default_factory=lambda: _EMPTY)
    cold_test_index: np.ndarray = field(default_factory=lambda: _EMPTY)
    item_field: str | None = None

    @property
    def name(self) -> str:
        return self.market.name

    def index(self, split: str) -> np.ndarray:
        parts = {
            "train": self.train_index,
            "valid": self.valid_index,
            "test": self.test_index,
            "cold_valid": self.cold_valid_index,
            "cold_test": self.cold_test_index,
        }
        if split not in parts:
            raise ValueError(f"split must be one of {sorted(parts)}, got {split!r}")
        return parts[split]

    def evaluation_summary(self) -> dict[str, Any]:
        """What ``metrics.json`` → ``evaluation`` says about this scenario's split (impressions, not users)."""
        items = self.market.sparse_fields.get(self.item_field or "", 0)
        catalog = 0
        if self.item_field is not None:
            col = list(self.market.sparse_fields).index(self.item_field)
            catalog = int(len(np.unique(self.market.sparse[self.train_index, col])))
        return {
            "protocol_version": self.protocol,
            "evaluated_impressions": int(len(self.test_index)),
            "evaluated_valid_impressions": int(len(self.valid_index)),
            "cold_test_impressions": int(len(self.cold_test_index)),
            "cold_test_positives": int(self.market.click[self.cold_test_index].sum()),
            "cold_valid_positives": int(self.market.click[self.cold_valid_index].sum()),
            "item_field": self.item_field or "",
            "catalog_items": catalog,
            "items": int(items),
            "collapsed_repeats": 0,
            "given_candidates": False,
        }


def split_impressions(
    market: MTLMarket, valid_frac: float = 0.1, test_frac: float = 0.1, seed: int = 2026, protocol: int = 2
) -> MTLSplit:
    """Split a scenario's impressions; seeded by (seed, scenario name) only, so every method sees the same.

    * predefined ``fold`` (AliExpress / Ali-CCP files): kept; when no row is a validation row, a seeded
      random ``valid_frac`` of train becomes validation.
    * ``groups`` + ``timestamps`` (the proxy, synthetic): per user by time, the user's last ``test_frac``
      of impressions (at least one) = test, the ``valid_frac`` before them = validation, the rest = train
      (the multi-task analogue of leave-one-out: the future of every user is held out). Ties in time are
      broken by a seeded random order, so a rated movie and the unrated ones stamped with its time are not
      systematically ordered. Users with fewer than 3 impressions stay in train.
    * otherwise (or ``meta["impression_split"] == "random"``) a seeded random split.

    Protocol 2 (default): validation and test impressions of an item with no train impression in the
    scenario (`item_field`) move to the cold-item report; protocol 1 keeps them in the main metrics.
    """
    if protocol not in (1, 2):
        raise ValueError(f"protocol must be 1 or 2, got {protocol!r}")
    if not (0 < valid_frac < 1 and 0 < test_frac < 1 and valid_frac + test_frac < 1):
        raise ValueError(
            f"valid_frac and test_frac must be in (0, 1) with sum < 1, got {valid_frac}, {test_frac}"
        )
    n = market.num_interactions
    rng = np.random.default_rng(market_seed(seed, market.name, 7))
    fold = np.zeros(n, dtype=np.int64)
    if market.fold is not None:
        fold = market.fold.copy()
        if not (fold == FOLD_VALID).any():
            train = np.flatnonzero(fold == FOLD_TRAIN)
            take = rng.permutation(train)[: max(1, int(round(valid_frac * len(train))))]
            fold[take] = FOLD_VALID
    elif (
        market.groups is not None
        and market.timestamps is not None
        and market.meta.get("impression_split", "temporal") == "temporal"
    ):
        order = np.lexsort((rng.random(n), market.timestamps, market.groups))
        g = market.groups[order]
        _, starts, counts = np.unique(g, return_index=True, return_counts=True)
        rank = np.arange(n) - np.repeat(starts, counts)
        size = np.repeat(counts, counts)
        n_test = np.maximum(1, np.ceil(test_frac * size)).astype(np.int64)
        n_valid = np.maximum(1, np.ceil(valid_frac * size)).astype(np.int64)
        eligible = size >= 3
        sorted_fold = np.where(
            eligible & (rank >= size - n_test),
            FOLD_TEST,
            np.where(eligible & (rank >= size - n_test - n_valid), FOLD_VALID, FOLD_TRAIN),
        )
        fold[order] = sorted_fold
    else:
        r = rng.random(n)
        fold[r < test_frac] = FOLD_TEST
        fold[(r >= test_frac) & (r < test_frac + valid_frac)] = FOLD_VALID
    idx = [np.flatnonzero(fold == f) for f in (FOLD_TRAIN, FOLD_VALID, FOLD_TEST)]
    for part, name in zip(idx, ("train", "valid", "test"), strict=True):
        if len(part) == 0:
            raise DataError(f"scenario {market.name!r}: the {name} split is empty")
    field_name = item_field(market)
    cold = [_EMPTY, _EMPTY]
    if protocol >= 2 and field_name is not None:
        items = market.sparse[:, list(market.sparse_fields).index(field_name)]
        warm = np.zeros(market.sparse_fields[field_name], dtype=bool)
        warm[items[idx[0]]] = True
        for k in (1, 2):
            is_cold = ~warm[items[idx[k]]]
            cold[k - 1] = idx[k][is_cold]
            idx[k] = idx[k][~is_cold]
            if len(idx[k]) == 0:
                name = ("valid", "test")[k - 1]
                raise DataError(
                    f"scenario {market.name!r}: every {name} impression is of an item never seen in train"
                )
    return MTLSplit(
        market,
        *idx,
        protocol=protocol,
        cold_valid_index=cold[0],
        cold_test_index=cold[1],
        item_field=field_name,
    )


# ------------------------------------------------------------------------------------ proxy impressions
def impressions_from_ratings(
    market: MarketData,
    negatives_per_positive: int = 2,
    conversion_rating: float = 5.0,
    seed: int = 0,
    drop_user_features: Sequence[str] = (),
    popularity: np.ndarray | None = None,
) -> MTLMarket:
    """The ML-1M-proxy construction of DATA.md applied to one rated market (module docstring).

    Unrated impressions are drawn per user without replacement ∝ the item's rating count in this market
    (Gumbel top-k over log-popularity); a user who rated almost the whole catalog gets all unrated items.
    ``popularity`` (one count per local item) replaces the market's own counts, e.g. counts over every
    scenario (``negatives_from="global"``).
    """
    if market.ratings is None:
        raise DataError(f"market {market.name!r} has no ratings: cannot derive conversions")
    rng = np.random.default_rng(market_seed(seed, market.name, 11))
    num_users, num_items = market.num_users, market.num_items
    # one row per (user, item): keep each user's last rating of an item
    order = np.lexsort((np.arange(market.num_interactions), market.timestamps, market.users))
    users, items = market.users[order], market.items[order]
    keys = users * num_items + items
    last = np.ones(len(keys), dtype=bool)
    last[:-1] = keys[1:] != keys[:-1]
    users, items = users[last], items[last]
    times, ratings = market.timestamps[order][last], market.ratings[order][last]
    if popularity is None:
        popularity = np.bincount(items, minlength=num_items).astype(np.float64)
    elif len(popularity) != num_items:
        raise DataError(
            f"market {market.name!r}: popularity has {len(popularity)} entries, {num_items} items"
        )
    popularity = np.asarray(popularity, dtype=np.float64)
    log_pop = np.log(np.maximum(popularity, 0.5))  # an item only ever seen by dropped rows keeps a tiny mass
    rated_count = np.bincount(users, minlength=num_users)
    starts = np.concatenate([[0], np.cumsum(rated_count)[:-1]])
    want = np.minimum(negatives_per_positive * rated_count, num_items - rated_count)

    neg_users, neg_items = [], []
    chunk = max(1, 4_000_000 // max(1, num_items))
    for lo in range(0, num_users, chunk):
        block = np.arange(lo, min(num_users, lo + chunk))
        scores = log_pop[None, :] + rng.gumbel(size=(len(block), num_items))
        row_of = np.repeat(np.arange(len(block)), rated_count[block])
        rated_rows = np.concatenate([np.arange(starts[u], starts[u] + rated_count[u]) for u in block])
        scores[row_of, items[rated_rows]] = -np.inf
        ranked = np.argsort(-scores, axis=1, kind="stable")
        take = np.arange(num_items)[None, :] < want[block][:, None]
        neg_items.append(ranked[take])
        neg_users.append(np.repeat(block, want[block]))
    neg_users = np.concatenate(neg_users)
    neg_items = np.concatenate(neg_items)
    # time-stamped like the user's own ratings: the time of a random rating of the same user
    pick = starts[neg_users] + (rng.random(len(neg_users)) * rated_count[neg_users]).astype(np.int64)
    neg_times = times[pick]

    all_users = np.concatenate([users, neg_users])
    all_items = np.concatenate([items, neg_items])
    all_times = np.concatenate([times, neg_times])
    click = np.concatenate([np.ones(len(users)), np.zeros(len(neg_users))])
    conversion = np.concatenate([(ratings >= conversion_rating).astype(np.float64), np.zeros(len(neg_users))])
    row_order = np.lexsort((rng.random(len(all_users)), all_times, all_users))

    columns = [all_users, all_items]
    fields = {"id_user": num_users, "id_item": num_items}
    sizes = market.meta.get("user_feature_sizes", {})
    if market.user_features is not None:
        for col in market.user_features.columns:
            if col in drop_user_features:
                continue
            values = np.asarray(market.user_features[col], dtype=np.int64)
            columns.append(values[all_users])
            fields[f"feat_{col}"] = int(sizes.get(col, values.max() + 1))
    item_sizes = market.meta.get("item_feature_sizes", {})
    if market.item_features is not None:
        for col in market.item_features.columns:
            values = np.asarray(market.item_features[col], dtype=np.int64)
            columns.append(values[all_items])
            fields[f"feat_{col}"] = int(item_sizes.get(col, values.max() + 1))
    if market.item_text is not None and "feat_genre" in fields:
        second = np.asarray([_second_genre(t) for t in market.item_text], dtype=np.int64)
        columns.append(second[all_items])
        fields["feat_genre2"] = len(movielens.ML_GENRES) + 1
    sparse = np.stack(columns, axis=1)[row_order]
    return MTLMarket(
        name=market.name,
        sparse=sparse,
        sparse_fields=fields,
        dense=np.zeros((len(sparse), 0), dtype=np.float32),
        click=click[row_order],
        conversion=conversion[row_order],
        groups=all_users[row_order],
        timestamps=all_times[row_order],
        meta={
            "proxy": True,
            "source": market.meta.get("population", "synthetic" if market.meta.get("synthetic") else ""),
            "negatives_per_positive": negatives_per_positive,
            "conversion_rating": conversion_rating,
        },
    )


_GENRES_RE = re.compile(r"Genres: (.*)$")


def _second_genre(text: str) -> int:
    match = _GENRES_RE.search(text or "")
    genres = [g.strip() for g in match.group(1).split(",")] if match else []
    return movielens.GENRE_CODE.get(genres[1], 0) if len(genres) > 1 else 0


def _save_npz(path: Path, markets: dict[str, MTLMarket]) -> None:
    arrays, manifest = {}, []
    for i, m in enumerate(markets.values()):
        for attr in ("sparse", "dense", "click", "conversion", "groups", "timestamps", "fold"):
            value = getattr(m, attr)
            if value is not None:
                arrays[f"{i}_{attr}"] = value
        manifest.append(
            {"name": m.name, "fields": m.sparse_fields, "dense_fields": m.dense_fields, "meta": m.meta}
        )
    arrays["manifest"] = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)  # atomic: a reader never sees a half-written entry
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load_npz(path: Path) -> dict[str, MTLMarket]:
    with np.load(path) as z:
        manifest = json.loads(bytes(z["manifest"]).decode())
        out = {}
        for i, entry in enumerate(manifest):
            get = lambda a, i=i: z[f"{i}_{a}"] if f"{i}_{a}" in z else None  # noqa: E731
            out[entry["name"]] = MTLMarket(
                name=entry["name"],
                sparse=get("sparse"),
                sparse_fields=entry["fields"],
                dense=get("dense"),
                click=get("click"),
                conversion=get("conversion"),
                groups=get("groups"),
                timestamps=get("timestamps"),
                fold=get("fold"),
                dense_fields=entry["dense_fields"],
                meta=entry["meta"],
            )
    return out


def load_ml1m_proxy(
    scenario: str,
    data_dir: str | Path | None = None,
    markets: Sequence[str] | None = None,
    use_cache: bool = True,
    negatives_per_positive: int = 2,
    seed: int = 0,
    negatives_from: str = "global",
    split: str = "random",
) -> dict[str, MTLMarket]:
    """The labelled ML-1M multi-task proxy with scenario = ``"age"`` (7) or ``"zip"`` (10) (module docstring).

    ``negatives_from``: ``"global"`` (default) draws a scenario's unrated impressions ∝ the movie's rating
    count over all of ML-1M, so a scenario's own taste (its items' popularity there) is learnable;
    ``"scenario"`` ∝ the count inside the scenario, which makes positives and negatives equally popular there
    and leaves only user × item signal. ``split``: ``"random"`` (default) = a seeded random 80/10/10 split of
    the impressions; ``"temporal"`` = per user, the last 10 % of impressions = test (`split_impressions`).
    The defaults reproduce the first check of DATA.md (Local MMoE on the smallest age group: test CTR AUC
    0.79 here vs its 0.82; ``scenario`` + ``temporal``: 0.68).
    """
    if scenario not in ("age", "zip"):
        raise DataError(f"ml1m proxy scenario must be 'age' or 'zip', got {scenario!r}")
    if negatives_from not in ("global", "scenario"):
        raise DataError(
            f"ml1m proxy option negatives_from must be 'global' or 'scenario', got {negatives_from!r}"
        )
    if split not in ("random", "temporal"):
        raise DataError(f"ml1m proxy option split must be 'random' or 'temporal', got {split!r}")
    valid = movielens.AGE_MARKETS if scenario == "age" else movielens.ZIP_MARKETS
    names = select_markets(markets, valid, f"ml1m-proxy-{scenario}")
    root = resolve_data_dir(data_dir)
    sources = list(movielens.population_files(root, "ml-1m").values())
    for path in sources:
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} not found")
    options = {"scenario": scenario, "negatives_per_positive": negatives_per_positive, "seed": seed}
    if negatives_from != "scenario":  # (older caches were built ∝ the scenario's own popularity)
        options["negatives_from"] = negatives_from
    # one cache file per scenario, so asking for one scenario builds only that one
    folder = resolve_cache_dir() / "ml1m-proxy" / cache_key("ml1m-proxy", PROXY_VERSION, sources, options)
    out: dict[str, MTLMarket] = {}
    missing = [n for n in names if not (use_cache and (folder / f"{n}.npz").is_file())]
    if missing:
        wanted = list(valid) if negatives_from == "global" else missing
        rated = movielens.load_movielens(scenario, root, wanted, use_cache, include_ml100k=False)
        counts: dict[Any, int] = {}
        if negatives_from == "global":  # rating counts over every scenario = all of ML-1M, by raw movie id
            for m in rated.values():
                keys, n = np.unique(m.item_ids[m.items], return_counts=True)
                for k, c in zip(keys.tolist(), n.tolist(), strict=True):
                    counts[k] = counts.get(k, 0) + c
        for name in missing:
            pop = None
            if negatives_from == "global":
                pop = np.asarray([counts.get(k, 0) for k in rated[name].item_ids.tolist()], dtype=np.float64)
            m = impressions_from_ratings(rated[name], negatives_per_positive, 5.0, seed, popularity=pop)
            m.meta.update({"label": f"ML-1M proxy (scenario = {scenario})", "split": scenario})
            out[name] = m
            if use_cache:
                _save_npz(folder / f"{name}.npz", {name: m})
    for name in names:
        if name not in out:
            out.update(_load_npz(folder / f"{name}.npz"))
        out[name].meta.update({"impression_split": split, "negatives_from": negatives_from})
    return {name: out[name] for name in names}


def load_synthetic_mtl(
    markets: Sequence[str] | None = None,
    num_markets: int = 4,
    users_per_market: int = 200,
    items_per_market: int = 150,
    interactions_per_user: tuple[int, int] = (10, 25),
    similarity: float = 0.8,
    task_conflict: float = 0.0,
    negatives_per_positive: int = 2,
    seed: int = 0,
) -> dict[str, MTLMarket]:
    """Synthetic scenarios (`fedmarket.data.synthetic`) as impressions; ``task_conflict`` ∈ [0, 1] pulls
    what converts away from what is clicked."""
    rated = synthetic.make_synthetic_markets(
        num_markets=num_markets,
        users_per_market=users_per_market,
        items_per_market=items_per_market,
        interactions_per_user=tuple(interactions_per_user),
        similarity=similarity,
        task_conflict=task_conflict,
        seed=seed,
    )
    names = select_markets(markets, list(rated), "synthetic-mtl")
    out = {}
    for name in names:
        m = impressions_from_ratings(rated[name], negatives_per_positive, 5.0, seed)
        m.meta.update({"label": "synthetic", "task_conflict": task_conflict, "similarity": similarity})
        out[name] = m
    return out


# ------------------------------------------------------------------------------------ real CSV layouts
def _check_columns(path: Path, frame: pd.DataFrame, required: Sequence[str]) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _labels(path: Path, frame: pd.DataFrame, column: str) -> np.ndarray:
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        raise DataError(f"{path}: line {int(np.flatnonzero(bad)[0]) + 2}: column {column!r} must be 0 or 1")
    return values.astype(np.float32)


def _codes(path: Path, frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    values = frame[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values != np.floor(values))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(
            f"{path}: line {row + 2}: column {columns[col]!r} must be a non-negative integer code"
        )
    return values.astype(np.int64)


def _dense(path: Path, frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    values = frame[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    if not np.isfinite(values).all():
        row, col = np.argwhere(~np.isfinite(values))[0]
        raise DataError(f"{path}: line {row + 2}: column {columns[col]!r} must be a finite number")
    return values.astype(np.float32)


def read_aliexpress_files(name: str, files: dict[int, list[Path]]) -> MTLMarket:
    """One AliExpress country from its CSV files, ``{fold: [paths]}``. Categorical codes are label-encoded
    per file set, so they are scenario-local (``id_*``); vocabulary = max code + 1."""
    frames, folds = [], []
    for fold, paths in files.items():
        for path in paths:
            frame = pd.read_csv(path)
            _check_columns(path, frame, ALIEXPRESS_COLUMNS)
            frames.append((path, frame))
            folds.append(np.full(len(frame), fold))
    if not frames:
        raise DataError(f"aliexpress: no CSV files for scenario {name!r}")
    sparse = np.concatenate([_codes(p, f, ALIEXPRESS_CATEGORICAL) for p, f in frames])
    dense = np.concatenate([_dense(p, f, ALIEXPRESS_NUMERICAL) for p, f in frames])
    click = np.concatenate([_labels(p, f, "click") for p, f in frames])
    conversion = np.concatenate([_labels(p, f, "conversion") for p, f in frames])
    session = pd.factorize(np.concatenate([f["search_id"].astype(str).to_numpy() for _, f in frames]))[0]
    fields = {f"id_{c}": int(sparse[:, i].max()) + 1 for i, c in enumerate(ALIEXPRESS_CATEGORICAL)}
    return MTLMarket(
        name=name,
        sparse=sparse,
        sparse_fields=fields,
        dense=dense,
        click=click,
        conversion=conversion,
        groups=session.astype(np.int64),
        fold=np.concatenate(folds),
        dense_fields=list(ALIEXPRESS_NUMERICAL),
        meta={"label": "AliExpress", "source": [str(p) for p, _ in frames]},
    )


def _role_files(folder: Path) -> dict[int, list[Path]]:
    files = sorted(folder.glob("*.csv"))
    roles: dict[int, list[Path]] = {FOLD_TRAIN: [], FOLD_VALID: [], FOLD_TEST: []}
    for path in files:
        stem = path.stem.lower()
        if "train" in stem:
            roles[FOLD_TRAIN].append(path)
        elif "val" in stem:
            roles[FOLD_VALID].append(path)
        elif "test" in stem:
            roles[FOLD_TEST].append(path)
    return {k: v for k, v in roles.items() if v}


def load_aliexpress(
    path: str | Path | None = None,
    data_dir: str | Path | None = None,
    markets: Sequence[str] | None = None,
    country: str = "us",
) -> dict[str, MTLMarket]:
    """AliExpress countries as scenarios. ``path``: a folder holding ``AliExpress_<CC>/`` subfolders
    (Tianchi / MTReclib layout, scenario ``cc``), or one folder of ``*train*.csv`` / ``*test*.csv`` for the
    single scenario ``country``. Default: ``<data dir>/mtl-samples/aliexpress`` (a schema fixture)."""
    folder = Path(path) if path is not None else resolve_data_dir(data_dir) / "mtl-samples" / "aliexpress"
    if not folder.is_dir():
        raise DataError(f"aliexpress: folder {str(folder)!r} not found")
    subfolders = sorted(
        p for p in folder.iterdir() if p.is_dir() and p.name.lower().startswith("aliexpress_")
    )
    found = {p.name.split("_", 1)[1].lower(): _role_files(p) for p in subfolders}
    if not found:
        found = {country: _role_files(folder)}
    found = {k: v for k, v in found.items() if v}
    if not found:
        raise DataError(f"aliexpress: no *train*/*test* CSV files under {str(folder)!r}")
    names = select_markets(markets, list(found), "aliexpress")
    return {name: read_aliexpress_files(name, found[name]) for name in names}


def load_aliccp(
    path: str | Path | None = None, data_dir: str | Path | None = None, markets: Sequence[str] | None = None
) -> dict[str, MTLMarket]:
    """Ali-CCP (torch-rechub layout) split into scenarios by field ``301`` (``s<value>``), which is then
    dropped from the inputs. Sparse codes are label-encoded over the whole dataset, so scenario
    vocabularies are shared (``feat_*``, vocabulary = max over all files + 1)."""
    folder = Path(path) if path is not None else resolve_data_dir(data_dir) / "mtl-samples" / "ali-ccp"
    if not folder.is_dir():
        raise DataError(f"aliccp: folder {str(folder)!r} not found")
    roles = _role_files(folder)
    if not roles:
        raise DataError(f"aliccp: no *train*/*val*/*test* CSV files under {str(folder)!r}")
    frames = []
    for fold, paths in roles.items():
        for p in paths:
            frame = pd.read_csv(p, dtype=str)
            _check_columns(p, frame, (*ALICCP_LABELS, ALICCP_SCENARIO_FIELD))
            frames.append((p, frame, fold))
    columns = list(frames[0][1].columns)
    dense_cols = [c for c in columns if c.startswith("D")]
    sparse_cols = [c for c in columns if c not in dense_cols and c not in ALICCP_LABELS]
    for p, frame, _ in frames:
        if list(frame.columns) != columns:
            raise DataError(f"{p}: columns differ from {frames[0][0].name}")
    sparse = np.concatenate([_codes(p, f, sparse_cols) for p, f, _ in frames])
    dense = np.concatenate([_dense(p, f, dense_cols) for p, f, _ in frames])
    click = np.concatenate([_labels(p, f, "click") for p, f, _ in frames])
    purchase = np.concatenate([_labels(p, f, "purchase") for p, f, _ in frames])
    fold = np.concatenate([np.full(len(f), k) for _, f, k in frames])
    scenario_col = sparse_cols.index(ALICCP_SCENARIO_FIELD)
    keep = [i for i in range(len(sparse_cols)) if i != scenario_col]
    fields = {f"feat_{sparse_cols[i]}": int(sparse[:, i].max()) + 1 for i in keep}
    found = {
        f"s{v}": np.flatnonzero(sparse[:, scenario_col] == v) for v in np.unique(sparse[:, scenario_col])
    }
    names = select_markets(markets, list(found), "aliccp")
    out = {}
    for name in names:
        rows = found[name]
        out[name] = MTLMarket(
            name=name,
            sparse=sparse[rows][:, keep],
            sparse_fields=dict(fields),
            dense=dense[rows],
            click=click[rows],
            conversion=purchase[rows],
            fold=fold[rows],
            dense_fields=dense_cols,
            meta={"label": "Ali-CCP", "scenario_field": ALICCP_SCENARIO_FIELD},
        )
    return out
