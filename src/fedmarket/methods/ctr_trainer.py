"""The CTR client trainer shared by every CTR method (Local, FedAvg, FedProx, FedPer, Centralized, FedMM).

Each market is tensorised once: a user-field table ``user_x [U, Fu]`` (local user ID + side features + any extra user fields
such as FedMM's optional (u1, u2)) and an
item-field table ``item_x [I, Fi]`` (local item ID + side features + any extra code fields such as FedMM's
(c1, c2)). A training batch is an index slice of per-epoch (user, item, label) arrays, gathered from those
tables; no per-row Python.

Training instances follow METHODS.md: each train interaction is a positive, with ``negatives`` items the
user never interacted with in train, resampled every epoch. Evaluation scores the seeded 1+99 candidates
(AUC, LogLoss, group AUC, HR/NDCG/MRR@K) and, optionally, the full catalog.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fedmarket.data.split import MarketSplit, SeenItems, market_seed, sample_train_negatives
from fedmarket.eval.metrics import candidate_ranking_metrics, ctr_metrics, full_ranking_metrics
from fedmarket.federation.core import ClientTrainer, MarketMetrics, RoundConfig, Update
from fedmarket.federation.payload import Payload, UploadDeclaration, load_payload_into, module_to_payload
from fedmarket.methods.epochs import (
    Proximal,
    epoch_rng,
    proximal_term,
    run_epoch,
    seed_dropout,
    tied_parameters,
)
from fedmarket.models.ctr import CTRModel, build_ctr_model, is_numeric


def _feature_table(ids: int, frame, prefix: str, use_side: bool) -> tuple[np.ndarray, dict[str, int]]:
    cols = [np.arange(ids, dtype=np.int64)]
    fields = {prefix: ids}
    if use_side and frame is not None:
        for col in frame.columns:
            values = np.asarray(frame[col], dtype=np.int64)
            if values.min() < 0:
                raise ValueError(f"side feature {col!r} has negative codes")
            cols.append(values)
            fields[f"{prefix}_{col}"] = int(values.max()) + 1
    return np.stack(cols, axis=1), fields


def _append_fields(
    table: np.ndarray,
    fields: dict[str, int],
    extra: dict[str, tuple[np.ndarray, int]] | None,
    side: str,
    other_fields: dict[str, int],
) -> np.ndarray:
    """Append extra columns to a feature table; ``fields`` grows. Categorical: one code per row in
    [0, vocab); numeric (name ``num_*``, `fedmarket.models.ctr.is_numeric`): fixed-point values, vocab 1."""
    for name, (codes, vocab) in (extra or {}).items():
        codes = np.asarray(codes, dtype=np.int64)
        if name in fields or name in other_fields:
            raise ValueError(f"extra {side} field {name!r} clashes with an existing field")
        if is_numeric(name):
            if codes.shape != (len(table),) or vocab != 1:
                raise ValueError(f"numeric {side} field {name!r} must hold {len(table)} values, vocab 1")
        elif codes.shape != (len(table),) or codes.min() < 0 or codes.max() >= vocab:
            raise ValueError(f"extra {side} field {name!r} must hold {len(table)} codes in [0, {vocab})")
        table = np.concatenate([table, codes[:, None]], axis=1)
        fields[name] = int(vocab)
    return table


@dataclass
class MarketView:
    """How one market's evaluation data maps into a trainer's index space (identity for a normal market;
    offsets or shared keys for a pooled trainer)."""

    split: MarketSplit
    user_map: np.ndarray  # market-local user -> model user row
    item_map: np.ndarray  # market-local item -> model item row


@dataclass
class CTRData:
    """Tensors a CTR trainer needs, in the model's index space."""

    user_x: torch.Tensor
    item_x: torch.Tensor
    fields: dict[str, int]
    num_user_fields: int
    train_users: np.ndarray
    train_items: np.ndarray
    train_seen: SeenItems
    views: dict[str, MarketView]

    @classmethod
    def from_split(
        cls,
        split: MarketSplit,
        use_side_features: bool = True,
        extra_item_fields: dict[str, tuple[np.ndarray, int]] | None = None,
        extra_user_fields: dict[str, tuple[np.ndarray, int]] | None = None,
    ) -> CTRData:
        """``extra_item_fields`` / ``extra_user_fields``: name → (one code per item / user, vocabulary size),
        appended as categorical fields after the item / user side features (FedMM's (c1, c2) and (u1, u2))."""
        m = split.market
        user_x, user_fields = _feature_table(m.num_users, m.user_features, "user", use_side_features)
        item_x, item_fields = _feature_table(m.num_items, m.item_features, "item", use_side_features)
        item_x = _append_fields(item_x, item_fields, extra_item_fields, "item", user_fields)
        user_x = _append_fields(user_x, user_fields, extra_user_fields, "user", item_fields)
        ident_u, ident_i = np.arange(m.num_users), np.arange(m.num_items)
        return cls(
            user_x=torch.from_numpy(user_x),
            item_x=torch.from_numpy(item_x),
            fields={**user_fields, **item_fields},
            num_user_fields=len(user_fields),
            train_users=split.train_users,
            train_items=split.train_items,
            train_seen=split.train_seen,
            views={m.name: MarketView(split, ident_u, ident_i)},
        )

    @property
    def num_items(self) -> int:
        return len(self.item_x)


class CTRClient(ClientTrainer):
    """Trains one CTR model on one market (or, for Centralized, on a pool of markets)."""

    def __init__(
        self,
        name: str,
        data: CTRData,
        declaration: UploadDeclaration,
        *,
        model: str = "deepfm",
        model_options: dict[str, Any] | None = None,
        lr: float = 0.002,
        weight_decay: float = 0.0,
        batch_size: int = 1024,
        negatives: int = 4,
        ks: tuple[int, ...] = (5, 10, 20),
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        self.market = name
        self.data = data
        self.declaration = declaration
        self.batch_size = batch_size
        self.negatives = negatives
        self.ks = tuple(ks)
        self.seed = seed
        self.progress = progress
        # shared parts must start identical in every market: seed the model from (seed) only, then
        # local tables differ only by their sizes
        torch.manual_seed(int(market_seed(seed, "__model__").generate_state(1)[0]))
        self.model: CTRModel = build_ctr_model(
            model, data.fields, data.num_user_fields, **(model_options or {})
        )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.model_name, self.model_options = model, dict(model_options or {})  # for `export_model`

    @property
    def markets(self) -> list[str]:
        return list(self.data.views)

    # ------------------------------------------------------------ federation
    def workload(self) -> int:
        """Train examples per round (`ClientTrainer.workload`)."""
        return len(self.data.train_users)

    def initial_payload(self) -> Payload:
        return module_to_payload(self.model, self.declaration)

    def upload(self) -> Payload:
        return module_to_payload(self.model, self.declaration)

    def proximal_term(self, anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
        """FedProx (Li et al., MLSys 2020, eq. 2): (μ/2)‖θ − θ_global‖² over the shared parameters."""
        return proximal_term(tied_parameters(self.model, anchor), mu)

    def fit(self, payload: Payload, config: RoundConfig) -> Update:
        load_payload_into(self.model, payload)
        mu = float(config.options.get("proximal_mu", 0.0))
        anchor = {k: torch.as_tensor(np.asarray(v)).clone() for k, v in payload.items()} if mu > 0 else {}
        losses = []
        for epoch in range(config.local_epochs):
            losses.append(self.train_epoch(config.seed, config.round, epoch, anchor, mu))
        upload = self.upload() if config.options.get("upload", True) else {}  # False: a local phase
        return Update(
            upload, num_examples=len(self.data.train_users), metrics={"loss": float(np.mean(losses))}
        )

    def epoch_instances(
        self, seed: int, server_round: int, epoch: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = epoch_rng(seed, self.market, server_round, epoch)
        d = self.data
        negs = sample_train_negatives(d.train_users, d.train_seen, d.num_items, self.negatives, rng)
        users = np.concatenate([d.train_users, np.repeat(d.train_users, self.negatives)])
        items = np.concatenate([d.train_items, negs.ravel()])
        labels = np.concatenate([np.ones(len(d.train_users)), np.zeros(negs.size)]).astype(np.float32)
        perm = rng.permutation(len(users))
        seed_dropout(rng)  # after the negatives and the permutation
        return users[perm], items[perm], labels[perm]

    def batch_x(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.data.user_x[users], self.data.item_x[items]], dim=1)

    def epoch_batches(
        self, seed: int, server_round: int, epoch: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(users, items, labels) batches of one epoch, slices of `epoch_instances` (drawn when iterated)."""
        users, items, labels = self.epoch_instances(seed, server_round, epoch)
        users_t, items_t, labels_t = (
            torch.from_numpy(users),
            torch.from_numpy(items),
            torch.from_numpy(labels),
        )
        starts = range(0, len(users), self.batch_size)
        for s in tqdm(starts, desc=f"{self.market} epoch", leave=False, disable=not self.progress):
            e = s + self.batch_size
            yield users_t[s:e], items_t[s:e], labels_t[s:e]

    def _batch_loss(
        self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Binary cross-entropy of one batch (`fedmarket.methods.epochs.LossFn`)."""
        users, items, labels = batch
        logits = self.model(self.batch_x(users, items))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        return loss, loss, len(logits)

    def train_epoch(self, seed: int, server_round: int, epoch: int, anchor: dict, mu: float) -> float:
        """One epoch of the shared loop (`fedmarket.methods.epochs.run_epoch`); the mean training loss."""
        batches = self.epoch_batches(seed, server_round, epoch)
        proximal = Proximal.of(self.model, anchor, mu)
        return run_epoch(self.model, self.optimizer, batches, self._batch_loss, proximal=proximal).mean

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def score_candidates(self, view: MarketView, users: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        self.model.eval()
        u = torch.from_numpy(np.repeat(view.user_map[users], candidates.shape[1]))
        i = torch.from_numpy(view.item_map[candidates.ravel()])
        out = torch.empty(len(u))
        for s in range(0, len(u), 65536):
            out[s : s + 65536] = self.model(self.batch_x(u[s : s + 65536], i[s : s + 65536]))
        return out.view(candidates.shape).numpy()

    @torch.no_grad()
    def evaluate(self, payload: Payload | None, split: str, full_ranking: bool = False) -> MarketMetrics:
        """Metrics of ``split`` per market; on ``test`` also the cold-item report (``cold_*`` keys: held-out
        positives without a train interaction, scored against cold and warm negatives; protocol 2)."""
        if payload:
            load_payload_into(self.model, payload)
        self.model.eval()
        results: MarketMetrics = {}
        for market, view in self.data.views.items():
            metrics = self._evaluate_set(view, split, full_ranking)
            if split == "test":
                cold = self._evaluate_set(view, "cold_test", False)
                metrics.update({f"cold_{k}": v for k, v in cold.items()})
            results[market] = metrics
        return results

    def _evaluate_set(self, view: MarketView, split: str, full_ranking: bool) -> dict[str, float]:
        es = view.split.eval_set(split)
        if len(es) == 0:
            return {}
        logits = self.score_candidates(view, es.users, es.candidates)
        labels = np.zeros(logits.shape, dtype=np.float32)
        labels[:, 0] = 1.0
        probs = 1.0 / (1.0 + np.exp(-logits))
        groups = np.repeat(es.users, logits.shape[1])
        metrics = ctr_metrics(labels.ravel(), probs.ravel(), groups)
        metrics.update(candidate_ranking_metrics(logits, ks=self.ks))
        if full_ranking:
            item_rows = self.data.item_x[torch.from_numpy(view.item_map)]

            def score_fn(chunk: np.ndarray, view=view, item_rows=item_rows) -> torch.Tensor:
                return self.model.score_matrix(
                    self.data.user_x[torch.from_numpy(view.user_map[chunk])], item_rows
                )

            metrics.update(
                full_ranking_metrics(
                    score_fn,
                    es.users,
                    es.positives,
                    view.split.seen_for(split),
                    ks=self.ks,
                    catalog=view.split.catalog_mask,
                )
            )
        return {k: float(v) for k, v in metrics.items()}

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    # ------------------------------------------------------------ export
    def export_model(self, market: str):
        """The current model and ``market``'s feature-table rows, for serving (`fedmarket.serving.models`)."""
        from fedmarket.serving.models import ctr_export

        return ctr_export(self.model, self.model_name, self.model_options, self.data, market)
