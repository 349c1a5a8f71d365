"""No-learning floors: ``popularity`` and ``popularity_recency`` (docs/protocol.md, "Fair baselines").

Every learned method must clear them. Each market scores a candidate item by a fixed number computed from its
own train interactions only:

- ``popularity``: the item's train interaction count.
- ``popularity_recency``: the same count with each interaction weighted by ``0.5 ** (age / half_life)``,
  age = the market's last train time minus the interaction's time, ``half_life`` = ``half_life_fraction``
  (default 0.1) of the market's train time span. Without a timestamp column the loader's time is the file
  row, so recency becomes "late in the file" (the loader warns).

An item with no train interaction (only in the cold-item report under protocol 2) gets the market's median
score: the floor knows nothing about it. Nothing leaves a market; there is nothing to train, so every round
is the same and the runtime's best round is round 1. LogLoss is not reported (a count is not a probability).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmarket.data.split import MarketSplit
from fedmarket.errors import ConfigError
from fedmarket.eval.metrics import candidate_ranking_metrics, ctr_metrics, full_ranking_metrics
from fedmarket.federation.core import ClientTrainer, MarketMetrics, RoundConfig, Update
from fedmarket.federation.payload import Payload, UploadDeclaration
from fedmarket.federation.strategies import NoFederation
from fedmarket.methods.base import Method, register

FLOOR_UPLOAD = UploadDeclaration((), "nothing leaves a market (no learning)")


@dataclass
class FloorOptions:
    half_life_fraction: float = 0.1

    def validate(self, prefix: str) -> None:
        if not (np.isfinite(self.half_life_fraction) and self.half_life_fraction > 0):
            raise ConfigError(f"{prefix}.half_life_fraction must be > 0, got {self.half_life_fraction}")


def item_scores(split: MarketSplit, recency: bool, half_life_fraction: float = 0.1) -> np.ndarray:
    """Per item of the market, the floor's score from train interactions only; items without one get the
    median score of the items that have one."""
    items = split.train_items
    weights = None
    if recency:
        times = split.train_timestamps.astype(np.float64)
        span = max(float(times.max() - times.min()), 1.0)
        weights = 0.5 ** ((times.max() - times) / (half_life_fraction * span))
    scores = np.bincount(items, weights=weights, minlength=split.market.num_items).astype(np.float64)
    if recency:  # break ties between equally recent-weighted items by plain popularity, a little
        scores += 1e-6 * np.bincount(items, minlength=split.market.num_items)
    warm = np.bincount(items, minlength=split.market.num_items) > 0
    if warm.any():
        scores[~warm] = float(np.median(scores[warm]))
    return scores


class FloorClient(ClientTrainer):
    """One market's no-learning scorer (see the module docstring)."""

    def __init__(self, market: str, split: MarketSplit, scores: np.ndarray, ks: tuple[int, ...]) -> None:
        self.market, self.split, self.scores, self.ks = market, split, scores, tuple(ks)

    def initial_payload(self) -> Payload:
        return {}

    def fit(self, payload: Payload, config: RoundConfig) -> Update:
        return Update({}, len(self.split.train_index), {})

    def evaluate(self, payload: Payload | None, split: str, full_ranking: bool = False) -> MarketMetrics:
        metrics = evaluate_item_scores(self.split, self.scores, split, full_ranking, self.ks)
        if split == "test":
            cold = evaluate_item_scores(self.split, self.scores, "cold_test", False, self.ks)
            metrics.update({f"cold_{k}": v for k, v in cold.items()})
        return {self.market: metrics}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def evaluate_item_scores(
    split: MarketSplit, scores: np.ndarray, which: str, full_ranking: bool, ks: tuple[int, ...] = (5, 10, 20)
) -> dict[str, float]:
    """The shared metrics of a fixed score per item on one evaluation set of ``split`` (AUC, GAUC and the
    ranking metrics; LogLoss NaN). Used by the floors and by tests that plant an artefact."""
    es = split.eval_set(which)
    if len(es) == 0:
        return {}
    cand = scores[es.candidates]
    labels = np.zeros(cand.shape, dtype=np.float32)
    labels[:, 0] = 1.0
    # AUC and GAUC use only the order: map the scores increasingly into (0, 1), equal scores staying equal
    uniq, inverse = np.unique(cand.ravel(), return_inverse=True)
    ranked = (inverse + 1.0) / (len(uniq) + 1.0)
    metrics = ctr_metrics(labels.ravel(), ranked, np.repeat(es.users, cand.shape[1]))
    metrics["logloss"] = float("nan")
    metrics.update(candidate_ranking_metrics(cand, ks=ks))
    if full_ranking:
        table = np.broadcast_to(scores, (1, len(scores)))
        metrics.update(
            full_ranking_metrics(
                lambda chunk: np.repeat(table, len(chunk), axis=0),
                es.users,
                es.positives,
                split.seen_for(which),
                ks=ks,
                catalog=split.catalog_mask,
            )
        )
    return {k: float(v) for k, v in metrics.items()}


class MTLFloorClient(ClientTrainer):
    """The floors on a multi-task scenario: an impression's CTR score is its item's train click count, its
    CTCVR score the item's train conversion count (recency-weighted for ``popularity_recency``); items with
    no train impression get the median. AUCs as the MMoE trainer reports them; LogLoss NaN."""

    def __init__(self, market: str, split, recency: bool, half_life_fraction: float) -> None:
        from fedmarket.data.mtl import item_field

        self.market, self.split = market, split
        m = split.market
        name = item_field(m)
        if name is None:
            raise ConfigError(
                f"scenario {market!r} has no item field (one of id_item, feat_205, or meta item_field): "
                "the popularity floors need one"
            )
        self.items = m.sparse[:, list(m.sparse_fields).index(name)]
        train = split.train_index
        weights = np.ones(len(train))
        if recency and m.timestamps is not None:
            times = m.timestamps[train].astype(np.float64)
            span = max(float(times.max() - times.min()), 1.0)
            weights = 0.5 ** ((times.max() - times) / (half_life_fraction * span))
        n = m.sparse_fields[name]
        seen = np.bincount(self.items[train], minlength=n) > 0
        self.scores = {}
        for key, label in (("ctr", m.click), ("ctcvr", m.ctcvr)):
            sc = np.bincount(self.items[train], weights=weights * label[train], minlength=n)
            sc += 1e-6 * np.bincount(self.items[train], weights=label[train], minlength=n)
            if seen.any():
                sc[~seen] = float(np.median(sc[seen]))
            self.scores[key] = sc

    def initial_payload(self) -> Payload:
        return {}

    def fit(self, payload: Payload, config: RoundConfig) -> Update:
        return Update({}, len(self.split.train_index), {})

    def _metrics(self, which: str) -> dict[str, float]:
        rows = self.split.index(which)
        m = self.split.market
        out = {}
        for key, label in (("ctr", m.click), ("ctcvr", m.ctcvr)):
            out[f"{key}_auc"] = ctr_metrics(label[rows], _ordered(self.scores[key][self.items[rows]]))["auc"]
            out[f"{key}_logloss"] = float("nan")
        aucs = [a for a in (out["ctr_auc"], out["ctcvr_auc"]) if np.isfinite(a)]
        out["mean_auc"] = float(np.mean(aucs)) if aucs else float("nan")
        return out

    def evaluate(self, payload: Payload | None, split: str, full_ranking: bool = False) -> MarketMetrics:
        metrics = self._metrics(split)
        if split == "test" and len(self.split.index("cold_test")):
            metrics.update({f"cold_{k}": v for k, v in self._metrics("cold_test").items()})
        return {self.market: metrics}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _ordered(scores: np.ndarray) -> np.ndarray:
    """Scores mapped increasingly into (0, 1), equal scores staying equal (AUC uses only the order)."""
    uniq, inverse = np.unique(scores, return_inverse=True)
    return (inverse + 1.0) / (len(uniq) + 1.0)


def _builder(recency: bool):
    def build(cfg, opts, splits, seed):
        from fedmarket.data.mtl import MTLSplit

        clients = {
            name: (
                MTLFloorClient(name, split, recency, opts.half_life_fraction)
                if isinstance(split, MTLSplit)
                else FloorClient(
                    name, split, item_scores(split, recency, opts.half_life_fraction), tuple(cfg.eval.ks)
                )
            )
            for name, split in splits.items()
        }
        return clients, NoFederation()

    return build


register(
    Method(
        "popularity",
        FLOOR_UPLOAD,
        _builder(False),
        FloorOptions,
        task="floor",
        summary="no learning: train interaction count per item (the floor every method must clear)",
    )
)
register(
    Method(
        "popularity_recency",
        FLOOR_UPLOAD,
        _builder(True),
        FloorOptions,
        task="floor",
        summary="no learning: train interaction count weighted by recency (half-life 10% of the train span)",
    )
)
