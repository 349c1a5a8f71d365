"""Leave-one-out splits and seeded 1+N candidate lists (docs/protocol.md, "Common protocol").

Per user, by time: last interaction = test, second-to-last = validation, the rest = train. Ties in time
keep source-file order (a stable sort). Users with fewer than ``min_user_interactions`` (default 3) keep
everything in train and are not evaluated. Candidates for validation/test are the held-out positive plus
``num_candidates`` items the user never interacted with (in any split), drawn uniformly without
replacement from a generator seeded by ``(split_seed, market name)`` only, so every method and every
training seed sees the same candidates.

Protocol version 2 (the default, `PROTOCOL_VERSION`):

* The evaluation **catalog** of a market is its items with at least one train interaction. Negatives (sampled
  and full-catalog) come only from it. An item that occurs only in validation/test exists in the data
  *because* someone interacted with it then; with it in the candidate lists a model could score "has no
  train history" and the metric would reward that instead of recommendation quality.
* A held-out positive that is cold (not in the catalog) is left out of the main metrics; it is counted
  (`MarketSplit.evaluation_summary`) and evaluated apart in the cold-item sets (``cold_valid`` /
  ``cold_test``: the cold positive plus negatives drawn from *every* item the user never interacted with,
  cold and warm alike, so a method that cannot score cold items shows chance there).
* Repeated (user, item) rows are collapsed to the last one by time (``repeats="collapse"``); the number of
  rows collapsed into each kept row is `MarketSplit.repeat_counts`. ``repeats="keep"`` keeps them for
  repeat-consumption data and counts the validation/test items that equal one of the user's train items.

Version 1 (``protocol=1``: catalog = every item, cold positives in the main metrics, repeats kept) is kept
only to reproduce records made under it; runs of different versions are never merged or compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from fedmarket.data.market import MarketData
from fedmarket.data.seeds import market_seed  # also imported from here by the runtimes
from fedmarket.errors import DataError

PROTOCOL_VERSION = 2
"""The evaluation protocol new runs use; written in every ``metrics.json`` as ``protocol_version``."""
PROTOCOLS = (1, 2)
REPEATS = ("collapse", "keep")


@dataclass
class SeenItems:
    """CSR of the items each user interacted with: items of user u are ``indices[indptr[u]:indptr[u+1]]``."""

    indptr: np.ndarray
    indices: np.ndarray
    num_items: int

    @classmethod
    def build(cls, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> SeenItems:
        keys = np.sort(users.astype(np.int64) * num_items + items.astype(np.int64))  # sort-based unique:
        keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys  # faster than np.unique's hash
        u = keys // num_items
        indptr = np.zeros(num_users + 1, dtype=np.int64)
        np.add.at(indptr, u + 1, 1)
        return cls(np.cumsum(indptr), (keys % num_items).astype(np.int64), num_items)

    @cached_property
    def sorted_keys(self) -> np.ndarray:
        u = np.repeat(np.arange(len(self.indptr) - 1, dtype=np.int64), np.diff(self.indptr))
        return u * self.num_items + self.indices

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Vectorised membership test of (user, item) pairs."""
        keys = self.sorted_keys
        q = users.astype(np.int64) * self.num_items + items.astype(np.int64)
        pos = np.searchsorted(keys, q)
        pos = np.minimum(pos, len(keys) - 1)
        return keys[pos] == q if len(keys) else np.zeros(len(q), dtype=bool)

    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)


@dataclass
class EvalSet:
    """One held-out positive per evaluated user plus its sampled negatives.

    ``candidates[:, 0]`` is the positive, ``candidates[:, 1:]`` the negatives.
    """

    users: np.ndarray
    candidates: np.ndarray

    @property
    def positives(self) -> np.ndarray:
        return self.candidates[:, 0]

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class MarketSplit:
    """Train interactions, validation and test sets of one market."""

    market: MarketData
    train_index: np.ndarray  # row indices into the market's interaction arrays
    valid: EvalSet
    test: EvalSet
    train_seen: SeenItems  # items in each user's train interactions
    history_seen: SeenItems  # train + validation items (excluded when ranking for test)
    catalog: np.ndarray | None = None  # bool per item: may be a candidate (v2: has a train interaction)
    cold_valid: EvalSet | None = None  # held-out positives outside the catalog (v2), evaluated apart
    cold_test: EvalSet | None = None
    valid_item: np.ndarray | None = None  # per user: the validation item (-1: user not evaluated)
    repeat_counts: np.ndarray | None = None  # per interaction row: how many raw rows it stands for
    protocol: int = PROTOCOL_VERSION
    collapsed_repeats: int = 0  # raw rows dropped by collapsing repeated (user, item) pairs
    repeated_heldout: dict[str, int] = field(default_factory=dict)  # repeats kept: held-out == a train item
    given_candidates: bool = False  # the candidate lists came with the data (no sampling)

    @property
    def name(self) -> str:
        return self.market.name

    @property
    def train_users(self) -> np.ndarray:
        return self.market.users[self.train_index]

    @property
    def train_items(self) -> np.ndarray:
        return self.market.items[self.train_index]

    @property
    def train_timestamps(self) -> np.ndarray:
        return self.market.timestamps[self.train_index]

    @property
    def train_ratings(self) -> np.ndarray | None:
        return None if self.market.ratings is None else self.market.ratings[self.train_index]

    def eval_set(self, split: str) -> EvalSet:
        """``valid`` / ``test``: the main metrics' sets; ``cold_valid`` / ``cold_test``: the cold-item sets
        (empty under protocol 1)."""
        if split in ("valid", "test"):
            return self.valid if split == "valid" else self.test
        if split in ("cold_valid", "cold_test"):
            es = getattr(self, split)
            if es is None:
                width = self.valid.candidates.shape[1]
                return EvalSet(np.zeros(0, np.int64), np.zeros((0, width), np.int64))
            return es
        raise ValueError(f"split must be 'valid', 'test', 'cold_valid' or 'cold_test', got {split!r}")

    def seen_for(self, split: str) -> SeenItems:
        """Items to exclude when ranking the full catalog for ``split``."""
        return self.history_seen if split.endswith("test") else self.train_seen

    @property
    def catalog_mask(self) -> np.ndarray:
        """Items that may be ranked in the main metrics (every item under protocol 1)."""
        if self.catalog is None:
            return np.ones(self.market.num_items, dtype=bool)
        return self.catalog

    def evaluation_summary(self) -> dict[str, int | bool]:
        """What ``metrics.json`` → ``evaluation`` says about this market's split."""
        cold = self.eval_set("cold_test")
        return {
            "protocol_version": self.protocol,
            "evaluated_users": int(len(self.test)),
            "evaluated_valid_users": int(len(self.valid)),
            "cold_test_positives": int(len(cold)),
            "cold_valid_positives": int(len(self.eval_set("cold_valid"))),
            "catalog_items": int(self.catalog_mask.sum()),
            "items": int(self.market.num_items),
            "collapsed_repeats": int(self.collapsed_repeats),
            "given_candidates": bool(self.given_candidates),
            **{f"repeated_{k}_items": int(v) for k, v in self.repeated_heldout.items()},
        }


DENSE_LIMIT = 200_000_000
"""Above this many (user × item) cells per split a market's negatives are drawn by rejection sampling
(`_sample_sparse`) instead of one random key per cell: the same distribution (a uniform subset of each user's
allowed unseen items), in time proportional to the number of users. Every market of the bundled datasets is
below it, so their candidate lists are those of the dense draw."""


def _sample_sparse(
    users: np.ndarray,
    all_seen: SeenItems,
    pool: np.ndarray,
    num_negatives: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """For each user, ``num_negatives`` distinct items of ``pool`` the user never interacted with, uniformly:
    sequential draws with replacement, rejecting seen items and repeats, are a uniform sample without
    replacement; a row left short is drawn again whole, with more draws (so rows stay independent)."""
    k = num_negatives
    out = np.empty((len(users), k), dtype=np.int64)
    chunk = max(1, 2_000_000 // (k + max(16, k // 4)))  # bounded memory: ~2 M draws at a time
    for start in range(0, len(users), chunk):
        part = slice(start, start + chunk)
        out[part] = _sample_sparse_rows(users[part], all_seen, pool, k, rng)
    return out


def _sample_sparse_rows(
    users: np.ndarray, all_seen: SeenItems, pool: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    out = np.empty((len(users), k), dtype=np.int64)
    pending = np.arange(len(users))
    width = k + max(
        16, k // 4
    )  # most draws are accepted (a user has seen few of many items); a short row redraws
    while len(pending):
        m = len(pending)
        draws = pool[rng.integers(0, len(pool), size=(m, width))]
        rows = np.repeat(np.arange(m), width)
        flat = draws.ravel()
        ok = ~all_seen.contains(users[pending][rows], flat)
        # first occurrence of each (row, item): stable sort by key, mark later copies
        key = rows.astype(np.int64) * (int(pool.max()) + 1) + flat
        order = np.argsort(key, kind="stable")
        repeat = np.zeros(len(key), dtype=bool)
        repeat[order[1:]] = key[order[1:]] == key[order[:-1]]
        ok &= ~repeat
        ok = ok.reshape(m, width)
        rank = np.cumsum(ok, axis=1)
        done = rank[:, -1] >= k
        take = ok & (rank <= k)
        out[pending[done]] = np.sort(draws[done][take[done]].reshape(-1, k), axis=1)
        pending = pending[~done]
        width *= 2
    return out


def _sample_candidates(
    users: np.ndarray,
    all_seen: SeenItems,
    num_items: int,
    num_negatives: int,
    rng: np.random.Generator,
    market: MarketData | str,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """Uniform sampling without replacement from each user's unseen items (among ``allowed`` ones, when
    given): the ``num_negatives`` smallest of random keys, with seen (and not allowed) items' keys set to
    +inf. Chunked so memory stays bounded."""
    if allowed is None:
        free = num_items - all_seen.counts()[users]
    else:
        seen_rows = np.repeat(np.arange(len(all_seen.indptr) - 1), all_seen.counts())
        seen_allowed = np.bincount(
            seen_rows, weights=allowed[all_seen.indices], minlength=len(all_seen.indptr) - 1
        ).astype(np.int64)
        free = int(allowed.sum()) - seen_allowed[users]
    if len(users) and free.min() < num_negatives:
        bad = users[np.argmin(free)]
        name = market if isinstance(market, str) else market.name
        raw = "" if isinstance(market, str) else f" {market.user_ids[bad]!r}"
        where = "unseen items" if allowed is None else "unseen items with a train interaction"
        raise DataError(
            f"market {name!r}: user{raw} has only {free.min()} {where}, fewer than the "
            f"{num_negatives} negatives asked for: lower eval.candidates to at most {free.min()}"
        )
    if len(users) * num_items > DENSE_LIMIT:
        pool = np.arange(num_items) if allowed is None else np.flatnonzero(allowed)
        return _sample_sparse(users, all_seen, pool, num_negatives, rng)
    out = np.empty((len(users), num_negatives), dtype=np.int64)
    chunk = max(1, 4_000_000 // max(1, num_items))
    for start in range(0, len(users), chunk):
        block = users[start : start + chunk]
        keys = rng.random((len(block), num_items), dtype=np.float32)
        if allowed is not None:
            keys[:, ~allowed] = np.inf
        rows, items = _seen_pairs(all_seen, block)
        keys[rows, items] = np.inf
        part = np.argpartition(keys, num_negatives - 1, axis=1)[:, :num_negatives]
        # order inside the list does not matter for metrics; sort for readability and determinism
        out[start : start + len(block)] = np.sort(part, axis=1)
    return out


def _seen_pairs(seen: SeenItems, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row position in ``users``, item) for every seen item of every user in ``users``, without a loop."""
    starts = seen.indptr[users]
    lengths = seen.indptr[users + 1] - starts
    rows = np.repeat(np.arange(len(users), dtype=np.int64), lengths)
    offset = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, seen.indices[np.repeat(starts, lengths) + offset]


def collapse_repeats(market: MarketData) -> tuple[MarketData, np.ndarray]:
    """``market`` with each repeated (user, item) pair reduced to its last row by (time, file order), and
    the number of raw rows each kept row stands for (a rating-like signal a method may use)."""
    n = market.num_interactions
    order = np.lexsort((np.arange(n), market.timestamps, market.items, market.users))
    key = market.users[order] * market.num_items + market.items[order]
    last = np.ones(n, dtype=bool)
    last[:-1] = key[1:] != key[:-1]
    keep = np.sort(order[last])
    if len(keep) == n:
        return market, np.ones(n, dtype=np.int64)
    group_end = np.flatnonzero(last)
    sizes = np.diff(np.concatenate([[-1], group_end]))
    counts = np.empty(n, dtype=np.int64)
    counts[order[last]] = sizes
    from dataclasses import replace

    collapsed = replace(
        market,
        users=market.users[keep],
        items=market.items[keep],
        timestamps=market.timestamps[keep],
        ratings=None if market.ratings is None else market.ratings[keep],
        meta=dict(market.meta),
    )
    return collapsed, counts[keep]


def leave_one_out(
    market: MarketData,
    num_candidates: int = 99,
    split_seed: int = 2026,
    min_user_interactions: int = 3,
    protocol: int = PROTOCOL_VERSION,
    repeats: str = "collapse",
) -> MarketSplit:
    """Split ``market`` per user by time and draw the seeded candidate lists (see the module docstring for
    what ``protocol`` 1 and 2 mean and what ``repeats`` does)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if repeats not in REPEATS:
        raise ValueError(f"repeats must be one of {REPEATS}, got {repeats!r}")
    collapsed = 0
    repeat_counts = None
    if protocol >= 2 and repeats == "collapse":
        raw_rows = market.num_interactions
        market, repeat_counts = collapse_repeats(market)
        collapsed = raw_rows - market.num_interactions
    if min_user_interactions < 2:
        # a user needs a validation and a test row; with fewer, the index arithmetic below would borrow a
        # row of the neighbouring user
        raise ValueError(f"min_user_interactions must be at least 2, got {min_user_interactions}")
    n = market.num_interactions
    # stable sort by (user, timestamp): ties keep file order
    order = np.lexsort((np.arange(n), market.timestamps, market.users))
    users_sorted = market.users[order]
    counts = np.bincount(market.users, minlength=market.num_users)
    ends = np.cumsum(counts)  # one past each user's last row in `order`
    evaluated = np.flatnonzero(counts >= min_user_interactions)
    if len(evaluated) == 0:
        raise DataError(
            f"market {market.name!r}: no user has at least {min_user_interactions} interactions; nothing to evaluate"
        )
    test_rows = order[ends[evaluated] - 1]
    valid_rows = order[ends[evaluated] - 2]
    is_train = np.ones(n, dtype=bool)
    is_train[test_rows] = False
    is_train[valid_rows] = False
    train_index = np.flatnonzero(is_train)
    del users_sorted

    all_seen = SeenItems.build(market.users, market.items, market.num_users, market.num_items)
    train_seen = SeenItems.build(
        market.users[train_index], market.items[train_index], market.num_users, market.num_items
    )
    hist_idx = np.concatenate([train_index, valid_rows])
    history_seen = SeenItems.build(
        market.users[hist_idx], market.items[hist_idx], market.num_users, market.num_items
    )

    valid_item = np.full(market.num_users, -1, dtype=np.int64)
    valid_item[evaluated] = market.items[valid_rows]
    rng = np.random.default_rng(market_seed(split_seed, market.name, 99))
    if protocol == 1:
        eval_sets = {}
        for split_name, rows in (("valid", valid_rows), ("test", test_rows)):
            negs = _sample_candidates(evaluated, all_seen, market.num_items, num_candidates, rng, market)
            cands = np.concatenate([market.items[rows][:, None], negs], axis=1)
            eval_sets[split_name] = EvalSet(users=evaluated.copy(), candidates=cands)
        return MarketSplit(
            market=market,
            train_index=train_index,
            valid=eval_sets["valid"],
            test=eval_sets["test"],
            train_seen=train_seen,
            history_seen=history_seen,
            valid_item=valid_item,
            protocol=1,
        )

    catalog = np.bincount(market.items[train_index], minlength=market.num_items) > 0
    cold_rng = np.random.default_rng(market_seed(split_seed, market.name, 199))
    eval_sets = {}
    for split_name, rows in (("valid", valid_rows), ("test", test_rows)):
        positives = market.items[rows]
        warm = catalog[positives]
        negs = _sample_candidates(
            evaluated[warm], all_seen, market.num_items, num_candidates, rng, market, catalog
        )
        eval_sets[split_name] = EvalSet(
            evaluated[warm], np.concatenate([positives[warm][:, None], negs], axis=1)
        )
        cold_users = evaluated[~warm]
        negs = _sample_candidates(cold_users, all_seen, market.num_items, num_candidates, cold_rng, market)
        eval_sets[f"cold_{split_name}"] = EvalSet(
            cold_users, np.concatenate([positives[~warm][:, None], negs], axis=1)
        )
    repeated = {}
    if repeats == "keep":
        repeated = {
            "valid": int(train_seen.contains(evaluated, market.items[valid_rows]).sum()),
            "test": int(history_seen.contains(evaluated, market.items[test_rows]).sum()),
        }
    return MarketSplit(
        market=market,
        train_index=train_index,
        valid=eval_sets["valid"],
        test=eval_sets["test"],
        train_seen=train_seen,
        history_seen=history_seen,
        catalog=catalog,
        cold_valid=eval_sets["cold_valid"],
        cold_test=eval_sets["cold_test"],
        valid_item=valid_item,
        repeat_counts=repeat_counts,
        protocol=protocol,
        collapsed_repeats=collapsed,
        repeated_heldout=repeated,
    )


def read_given_candidates(split: MarketSplit, path: Path, which: str) -> EvalSet:
    """The evaluation set of ``which`` ("valid" or "test") from a candidate file that came with the data: CSV
    or TSV with columns ``user``, ``item``, ``label`` (raw ids; 1 = the held-out positive, 0 = a negative),
    one positive and the same number N of negatives per user, as public benchmark kits ship them. The lists
    are scored exactly as given (no sampling, no catalog rule). The positive must be the user's held-out item
    of that split; users not in the file are not evaluated. Every problem is one error naming the file, and
    the line where there is one."""
    import pandas as pd

    m = split.market
    sep = "\t" if path.suffix in (".tsv", ".txt") else ","
    try:
        frame = pd.read_csv(path, sep=sep, dtype={"user": str, "item": str})
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read it as a candidate file ({exc})") from None
    missing = [c for c in ("user", "item", "label") if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (need user, item, label)")
    line = np.arange(len(frame)) + 2  # 1-based, header = line 1
    labels = pd.to_numeric(frame["label"], errors="coerce").to_numpy()
    bad = ~np.isin(labels, (0, 1))
    if bad.any():
        raise DataError(
            f"{path}, line {line[bad][0]}: label must be 0 or 1, got {frame['label'].iloc[np.argmax(bad)]!r}"
        )
    user_index = {str(u): i for i, u in enumerate(m.user_ids)}
    item_index = {str(i): j for j, i in enumerate(m.item_ids)}
    users = frame["user"].map(user_index)
    items = frame["item"].map(item_index)
    for col, mapped in (("user", users), ("item", items)):
        unknown = mapped.isna().to_numpy()
        if unknown.any():
            raise DataError(
                f"{path}, line {line[unknown][0]}: {col} {frame[col].iloc[np.argmax(unknown)]!r} is not in market {m.name!r}"
            )
    users, items = users.to_numpy(np.int64), items.to_numpy(np.int64)
    order = np.lexsort((-labels, users))  # per user: the positive first, then the negatives in file order
    users, items, labels, line = users[order], items[order], labels[order], line[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    sizes = np.diff(np.r_[starts, len(users)])
    positives = np.add.reduceat(labels, starts)
    if (positives != 1).any():
        k = int(np.argmax(positives != 1))
        raise DataError(
            f"{path}: user {m.user_ids[users[starts[k]]]!r} has {int(positives[k])} positives (label 1); exactly one is needed"
        )
    if (sizes != sizes[0]).any():
        k = int(np.argmax(sizes != sizes[0]))
        raise DataError(
            f"{path}: user {m.user_ids[users[starts[k]]]!r} has {sizes[k] - 1} negatives, the first user {sizes[0] - 1}; "
            "every list needs the same length"
        )
    list_users = users[starts]
    cands = items.reshape(len(starts), sizes[0])
    held = split.valid_item if which == "valid" else _test_items(split)
    wrong = held[list_users] != cands[:, 0]
    if wrong.any():
        k = int(np.argmax(wrong))
        raise DataError(
            f"{path}, line {line[starts[k]]}: the positive of user {m.user_ids[list_users[k]]!r} is "
            f"{m.item_ids[cands[k, 0]]!r}, but the user's held-out {which} item is "
            f"{m.item_ids[held[list_users[k]]] if held[list_users[k]] >= 0 else 'none (too few interactions)'!r}"
        )
    return EvalSet(list_users, cands)


def _test_items(split: MarketSplit) -> np.ndarray:
    """Per user, the held-out test item (-1 for users not evaluated)."""
    out = np.full(split.market.num_users, -1, dtype=np.int64)
    for es in (split.test, split.cold_test):
        if es is not None:
            out[es.users] = es.positives
    return out


def use_given_candidates(split: MarketSplit, folder: Path) -> MarketSplit:
    """``split`` with the candidate lists of ``folder/<market>.test.{csv,tsv}`` (and ``<market>.valid.*`` when
    present; validation keeps its sampled lists otherwise); see `read_given_candidates`."""
    from dataclasses import replace

    found = {}
    for which in ("valid", "test"):
        for suffix in (".csv", ".tsv"):
            path = folder / f"{split.name}.{which}{suffix}"
            if path.is_file():
                found[which] = read_given_candidates(split, path, which)
                break
    if "test" not in found:
        raise DataError(f"eval.given_candidates: no {split.name}.test.csv (or .tsv) in {folder}")
    empty = EvalSet(np.zeros(0, np.int64), np.zeros((0, found["test"].candidates.shape[1]), np.int64))
    return replace(
        split,
        test=found["test"],
        valid=found.get("valid", split.valid),
        cold_test=empty,
        cold_valid=split.cold_valid if "valid" not in found else empty,
        given_candidates=True,
    )


def sample_train_negatives(
    users: np.ndarray, seen: SeenItems, num_items: int, per_positive: int, rng: np.random.Generator
) -> np.ndarray:
    """For each user in ``users``, ``per_positive`` items outside the user's train items (with replacement,
    rejection-sampled, vectorised). Returns shape ``(len(users), per_positive)``."""
    u = np.repeat(users.astype(np.int64), per_positive)
    items = rng.integers(0, num_items, size=len(u))
    for _ in range(50):
        bad = seen.contains(u, items)
        if not bad.any():
            break
        items[bad] = rng.integers(0, num_items, size=int(bad.sum()))
    return items.reshape(len(users), per_positive)


def split_settings(ev) -> list:
    """Everything of an `EvalConfig` a split depends on (the key of every cache of splits)."""
    return [ev.candidates, ev.split_seed, ev.protocol, ev.repeats, ev.given_candidates]


def split_for_config(market, ev) -> MarketSplit:
    """The split every runtime (in-process, Flower ClientApp) makes of one market under an `EvalConfig`:
    leave-one-out (protocol, repeats, given candidate lists) for interaction markets; the per-user temporal
    impression split for multi-task scenarios (`fedmarket.data.mtl.MTLMarket`, which carry their own
    click/conversion labels)."""
    from fedmarket.data.mtl import MTLMarket, split_impressions

    if isinstance(market, MTLMarket):
        return split_impressions(market, seed=ev.split_seed, protocol=ev.protocol)
    split = leave_one_out(market, ev.candidates, ev.split_seed, protocol=ev.protocol, repeats=ev.repeats)
    if ev.given_candidates:
        split = use_given_candidates(split, Path(ev.given_candidates).expanduser())
    return split
