"""Leave-one-out splits and seeded 1+N candidate lists (METHODS.md, "Common protocol").

Per user, by time: last interaction = test, second-to-last = validation, the rest = train. Ties in time
keep source-file order (a stable sort). Users with fewer than ``min_user_interactions`` (default 3) keep
everything in train and are not evaluated. Candidates for validation/test are the held-out positive plus
``num_candidates`` items the user never interacted with (in any split), drawn uniformly without
replacement from a generator seeded by ``(split_seed, market name)`` only, so every method and every
training seed sees the same candidates.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fedmarket.data.market import MarketData
from fedmarket.errors import DataError


def market_seed(seed: int, market: str, *salt: int) -> np.random.SeedSequence:
    """A seed sequence that depends only on (seed, market name, salt...), stable across runs and Python."""
    return np.random.SeedSequence([int(seed), zlib.crc32(market.encode("utf-8")), *[int(s) for s in salt]])


@dataclass
class SeenItems:
    """CSR of the items each user interacted with: items of user u are ``indices[indptr[u]:indptr[u+1]]``."""

    indptr: np.ndarray
    indices: np.ndarray
    num_items: int

    @classmethod
    def build(cls, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> SeenItems:
        keys = np.unique(users.astype(np.int64) * num_items + items.astype(np.int64))
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
        if split not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        return self.valid if split == "valid" else self.test

    def seen_for(self, split: str) -> SeenItems:
        """Items to exclude when ranking the full catalog for ``split``."""
        return self.train_seen if split == "valid" else self.history_seen


def _sample_candidates(
    users: np.ndarray,
    all_seen: SeenItems,
    num_items: int,
    num_negatives: int,
    rng: np.random.Generator,
    market: str,
) -> np.ndarray:
    """Uniform sampling without replacement from each user's unseen items: the ``num_negatives`` smallest of
    random keys, with seen items' keys set to +inf. Chunked so memory stays bounded."""
    free = num_items - all_seen.counts()[users]
    if len(users) and free.min() < num_negatives:
        bad = users[np.argmin(free)]
        raise DataError(
            f"market {market!r}: user index {bad} has only {free.min()} unseen items, fewer than the "
            f"{num_negatives} sampled negatives asked for (lower eval.candidates)"
        )
    out = np.empty((len(users), num_negatives), dtype=np.int64)
    chunk = max(1, 4_000_000 // max(1, num_items))
    for start in range(0, len(users), chunk):
        block = users[start : start + chunk]
        keys = rng.random((len(block), num_items), dtype=np.float32)
        for row, u in enumerate(block):
            keys[row, all_seen.indices[all_seen.indptr[u] : all_seen.indptr[u + 1]]] = np.inf
        part = np.argpartition(keys, num_negatives - 1, axis=1)[:, :num_negatives]
        # order inside the list does not matter for metrics; sort for readability and determinism
        out[start : start + len(block)] = np.sort(part, axis=1)
    return out


def leave_one_out(
    market: MarketData, num_candidates: int = 99, split_seed: int = 2026, min_user_interactions: int = 3
) -> MarketSplit:
    """Split ``market`` per user by time and draw the seeded candidate lists."""
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

    rng = np.random.default_rng(market_seed(split_seed, market.name, 99))
    eval_sets = {}
    for split_name, rows in (("valid", valid_rows), ("test", test_rows)):
        negs = _sample_candidates(evaluated, all_seen, market.num_items, num_candidates, rng, market.name)
        cands = np.concatenate([market.items[rows][:, None], negs], axis=1)
        eval_sets[split_name] = EvalSet(users=evaluated.copy(), candidates=cands)
    return MarketSplit(
        market=market,
        train_index=train_index,
        valid=eval_sets["valid"],
        test=eval_sets["test"],
        train_seen=train_seen,
        history_seen=history_seen,
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
