"""A configuration's markets, loaded and split once per process (`prepare_data`).

Below the API and the methods: it imports neither `fedmarket.api` nor `fedmarket.methods`, so a method
(e.g. FedMM's analysis, `fedmarket.methods.fedmm.analysis`) may read a run's data without an import cycle.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmarket.config import ExperimentConfig
from fedmarket.data.market import MarketData
from fedmarket.data.registry import load_dataset
from fedmarket.data.split import MarketSplit, split_for_config, split_settings


@dataclass
class PreparedData:
    markets: dict[str, MarketData]
    splits: dict[str, MarketSplit]

    @property
    def fingerprint(self) -> str:
        """A short hash of the interactions every market holds (names, users, items, times, raw keys): two
        runs compare only when they ran on the same data."""
        if not hasattr(self, "_fingerprint"):
            sha = hashlib.sha1()
            for name in sorted(self.markets):
                m = self.markets[name]
                sha.update(name.encode())
                for attr in ("users", "items", "timestamps"):
                    arr = getattr(m, attr, None)
                    if isinstance(arr, np.ndarray):
                        sha.update(np.ascontiguousarray(arr).tobytes())
                for attr in ("user_ids", "item_ids"):
                    arr = getattr(m, attr, None)
                    if arr is not None:
                        sha.update("\x1f".join(map(str, arr)).encode())
            self._fingerprint = sha.hexdigest()[:16]
        return self._fingerprint

    def evaluation(self) -> dict[str, dict[str, Any]]:
        """``metrics.json`` → ``evaluation``: per market, what the protocol evaluated and left out."""
        return {n: s.evaluation_summary() for n, s in self.splits.items() if hasattr(s, "evaluation_summary")}


_PREPARED: dict[str, PreparedData] = {}


def prepare_data(cfg: ExperimentConfig) -> PreparedData:
    """Load and split the configured markets (memoised per process: a comparison of many methods on the
    same data loads and splits it once)."""
    d = cfg.dataset
    key = json.dumps(
        [d.name, d.markets, d.data_dir, d.options, *split_settings(cfg.eval)],
        sort_keys=True,
        default=str,
    )
    if key not in _PREPARED:
        markets = load_dataset(
            d.name, data_dir=d.data_dir, markets=d.markets, use_cache=d.use_cache, **d.options
        )
        splits = {n: split_for_config(m, cfg.eval) for n, m in markets.items()}
        _PREPARED[key] = PreparedData(markets, splits)
    return _PREPARED[key]
