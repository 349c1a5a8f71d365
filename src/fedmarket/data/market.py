"""`MarketData`: one market's interactions in its own contiguous ID space.

A market never sees another market's `MarketData`. Indices are local: market A's item 17 and market B's
item 17 are unrelated. `user_ids` / `item_ids` map local indices back to the raw keys (used only by
not-private baselines such as Central-shared-IDs and by analysis, never by a federated method).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedmarket.errors import DataError


@dataclass
class MarketData:
    """Interactions of one market.

    Arrays are aligned, one entry per interaction, in source-file order (ties in time keep file order).

    Attributes:
        name: market name (e.g. ``"de"``).
        users, items: local int64 indices in ``[0, num_users)`` / ``[0, num_items)``.
        timestamps: int64 (Unix seconds or day ordinals); only the order matters.
        ratings: float32 explicit rating, or ``None`` for purely implicit data.
        user_ids, item_ids: raw keys, ``user_ids[u]`` is the raw id of local user ``u``.
        item_text: optional text per local item (title, categories...), for text encoders.
        user_features / item_features: optional categorical side features, one row per local
            user / item, integer-coded columns (0 = unknown), so CTR models can embed them.
    """

    name: str
    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    user_ids: np.ndarray
    item_ids: np.ndarray
    ratings: np.ndarray | None = None
    item_text: list[str] | None = None
    user_features: pd.DataFrame | None = None
    item_features: pd.DataFrame | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.users)
        if n == 0:
            raise DataError(f"market {self.name!r} has no interactions")
        for attr in ("items", "timestamps"):
            if len(getattr(self, attr)) != n:
                raise DataError(
                    f"market {self.name!r}: {attr} has {len(getattr(self, attr))} rows, users has {n}"
                )
        if self.ratings is not None and len(self.ratings) != n:
            raise DataError(f"market {self.name!r}: ratings length differs from users")
        self.users = np.asarray(self.users, dtype=np.int64)
        self.items = np.asarray(self.items, dtype=np.int64)
        self.timestamps = np.asarray(self.timestamps, dtype=np.int64)
        if self.ratings is not None:
            self.ratings = np.asarray(self.ratings, dtype=np.float32)
        if self.users.min() < 0 or self.users.max() >= len(self.user_ids):
            raise DataError(f"market {self.name!r}: user index outside [0, {len(self.user_ids)})")
        if self.items.min() < 0 or self.items.max() >= len(self.item_ids):
            raise DataError(f"market {self.name!r}: item index outside [0, {len(self.item_ids)})")
        if self.item_text is not None and len(self.item_text) != len(self.item_ids):
            raise DataError(
                f"market {self.name!r}: item_text has {len(self.item_text)} entries for {len(self.item_ids)} items"
            )
        for attr, n_rows in (("user_features", self.num_users), ("item_features", self.num_items)):
            frame = getattr(self, attr)
            if frame is not None and len(frame) != n_rows:
                raise DataError(f"market {self.name!r}: {attr} has {len(frame)} rows for {n_rows} entities")

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_interactions(self) -> int:
        return len(self.users)

    @classmethod
    def from_raw(
        cls,
        name: str,
        raw_users: np.ndarray,
        raw_items: np.ndarray,
        timestamps: np.ndarray,
        ratings: np.ndarray | None = None,
        **kwargs,
    ) -> MarketData:
        """Build a market from raw keys, assigning contiguous local indices in order of first appearance."""
        if len(raw_users) == 0:
            raise DataError(f"market {name!r} has no interactions")
        user_codes, user_ids = pd.factorize(pd.Series(raw_users), sort=False)
        item_codes, item_ids = pd.factorize(pd.Series(raw_items), sort=False)
        return cls(
            name=name,
            users=user_codes.astype(np.int64),
            items=item_codes.astype(np.int64),
            timestamps=np.asarray(timestamps, dtype=np.int64),
            user_ids=np.asarray(user_ids, dtype=object),
            item_ids=np.asarray(item_ids, dtype=object),
            ratings=None if ratings is None else np.asarray(ratings, dtype=np.float32),
            **kwargs,
        )

    def summary(self) -> dict:
        return {
            "market": self.name,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "density": self.num_interactions / max(1, self.num_users * self.num_items),
        }
