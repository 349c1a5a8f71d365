"""The multi-task (CTR + CTCVR) client trainer shared by PF-MSMTrec and its baselines.

A scenario is tensorised once (`MTLData`: categorical codes, dense features, click and CTCVR labels);
batches are index slices of a per-epoch permutation of the train rows. The local objective (METHODS.md,
PF-MSMTrec step 6) is

    L_k = BCE(y_CTR, p_CTR) + BCE(y_CTCVR, p_CTCVR) + (μ/2)·‖θ_k − θ̄_k‖²

over the aggregated parameters θ (the round's download θ̄_k; μ = ``proximal_mu`` in the round options, 0
for plain FedAvg). Ditto (Li et al., ICML 2021) keeps a second, personal model v_k trained on
BCE + (λ/2)‖v_k − θ̄‖² next to the federated one and evaluates with it (``ditto_lambda`` > 0).

Round options the trainer understands: ``proximal_mu``, ``ditto_lambda``, ``upload`` (False: train
locally and upload nothing, the fine-tuning phase of "FedAvg + local fine-tune").

Metrics per scenario: ``ctr_auc``, ``ctcvr_auc``, ``ctr_logloss``, ``ctcvr_logloss`` and ``mean_auc`` (the
mean of the two AUCs, the default model-selection score).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmarket.data.mtl import MTLSplit
from fedmarket.data.split import market_seed
from fedmarket.eval.metrics import ctr_metrics
from fedmarket.federation.core import ClientTrainer, MarketMetrics, RoundConfig, Update
from fedmarket.federation.payload import Payload, UploadDeclaration, load_payload_into, module_to_payload
from fedmarket.methods.epochs import Proximal, epoch_rng, run_epoch, seed_dropout
from fedmarket.models.mmoe import MMoE

_GATHER_BATCHES = 64
"""Training batches whose rows `MTLClient._batches` gathers with one index op."""


@dataclass
class MTLData:
    """Tensors of one scenario (or of a pool of scenarios for the centralised reference)."""

    sparse: torch.Tensor
    dense: torch.Tensor
    click: torch.Tensor
    ctcvr: torch.Tensor
    fields: dict[str, int]
    train_index: np.ndarray
    views: dict[str, dict[str, np.ndarray]]  # scenario -> split -> row indices

    @classmethod
    def from_split(cls, split: MTLSplit) -> MTLData:
        m = split.market
        return cls(
            sparse=torch.from_numpy(m.sparse),
            dense=torch.from_numpy(m.dense),
            click=torch.from_numpy(m.click),
            ctcvr=torch.from_numpy(m.ctcvr),
            fields=dict(m.sparse_fields),
            train_index=split.train_index,
            views={
                m.name: {
                    "valid": split.valid_index,
                    "test": split.test_index,
                    "cold_test": getattr(split, "cold_test_index", np.zeros(0, dtype=np.int64)),
                }
            },
        )

    @classmethod
    def pooled(cls, splits: dict[str, MTLSplit]) -> MTLData:
        """All scenarios in one table, NOT PRIVATE: ``id_*`` codes offset per scenario (scenario-prefixed IDs),
        ``feat_*`` vocabularies shared, plus a ``feat_scenario`` field (scenario as a feature)."""
        parts = [MTLData.from_split(s) for s in splits.values()]
        first = parts[0]
        for name, p in zip(splits, parts, strict=True):
            if list(p.fields) != list(first.fields) or p.dense.shape[1] != first.dense.shape[1]:
                raise ValueError(
                    f"scenario {name!r} has fields {list(p.fields)}, others {list(first.fields)}"
                )
        fields: dict[str, int] = {}
        offsets = np.zeros((len(parts), len(first.fields)), dtype=np.int64)
        for col, fname in enumerate(first.fields):
            sizes = [p.fields[fname] for p in parts]
            if fname.startswith("id_"):
                offsets[:, col] = np.cumsum([0] + sizes[:-1])
                fields[fname] = int(sum(sizes))
            else:
                fields[fname] = int(max(sizes))
        fields["feat_scenario"] = len(parts)
        sparse, views, train, start = [], {}, [], 0
        for i, (name, p) in enumerate(zip(splits, parts, strict=True)):
            scen = torch.full((len(p.sparse), 1), i, dtype=torch.long)
            sparse.append(torch.cat([p.sparse + torch.from_numpy(offsets[i]), scen], dim=1))
            views[name] = {k: v + start for k, v in p.views[name].items()}
            train.append(p.train_index + start)
            start += len(p.sparse)
        return cls(
            sparse=torch.cat(sparse),
            dense=torch.cat([p.dense for p in parts]),
            click=torch.cat([p.click for p in parts]),
            ctcvr=torch.cat([p.ctcvr for p in parts]),
            fields=fields,
            train_index=np.concatenate(train),
            views=views,
        )


class MTLClient(ClientTrainer):
    """Trains one MMoE on one scenario (or on a pool, for the centralised reference).

    ``upload`` is the subset of the method's declaration this client sends (a method's options may narrow
    it, e.g. PF-MSMTrec without tower aggregation); the runtime still checks every upload against the
    method's own declaration.
    """

    def __init__(
        self,
        name: str,
        data: MTLData,
        upload: UploadDeclaration,
        *,
        model_options: dict[str, Any] | None = None,
        lr: float = 0.002,
        weight_decay: float = 0.0,
        batch_size: int = 2048,
        seed: int = 0,
    ) -> None:
        self.market = name
        self.data = data
        self.upload_declaration = upload
        self.batch_size = batch_size
        self.lr, self.weight_decay = lr, weight_decay
        # shared parts start identical in every scenario: the model is seeded by the training seed only
        torch.manual_seed(int(market_seed(seed, "__model__").generate_state(1)[0]))
        self.model_options = dict(model_options or {})
        self.model = MMoE(data.fields, data.dense.shape[1], **self.model_options)
        self.optimizer = self._adam(self.model)
        self.personal: MMoE | None = None  # Ditto's personal model, created on first use
        self.personal_optimizer: torch.optim.Optimizer | None = None
        self._labels: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}  # evaluation labels, constant

    def _adam(self, model: MMoE) -> torch.optim.Optimizer:
        """Adam over ``model``. ``foreach=True`` runs the same per-tensor update ops (lerp_, mul_, addcmul_,
        sqrt, div_, add_, addcdiv_ with the same scalars, bit-identical; tests/test_mtl_perf_equivalence.py)
        from one C++ loop instead of ~8 Python-dispatched ops per parameter tensor, which PyTorch only does
        by default on GPUs; on CPU it is about a sixth of a training step of these small models."""
        return torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay, foreach=True)

    @property
    def markets(self) -> list[str]:
        return list(self.data.views)

    # ------------------------------------------------------------ federation
    def workload(self) -> int:
        """Train examples per round (`ClientTrainer.workload`)."""
        return len(self.data.train_index)

    def initial_payload(self) -> Payload:
        return module_to_payload(self.model, self.upload_declaration)

    def fit(self, payload: Payload, config: RoundConfig) -> Update:
        load_payload_into(self.model, payload)
        opts = config.options
        mu = float(opts.get("proximal_mu", 0.0))
        ditto = float(opts.get("ditto_lambda", 0.0))
        anchor = {k: torch.as_tensor(np.asarray(v)).clone() for k, v in payload.items()}
        losses = []
        for epoch in range(config.local_epochs):
            rows = self._epoch_rows(config.seed, config.round, epoch)
            losses.append(self._train_epoch(self.model, self.optimizer, rows, anchor if mu > 0 else {}, mu))
            if ditto > 0:
                if self.personal is None:
                    self.personal = copy.deepcopy(self.model)
                    self.personal_optimizer = self._adam(self.personal)
                self._train_epoch(self.personal, self.personal_optimizer, rows, anchor, ditto)
        upload = module_to_payload(self.model, self.upload_declaration) if opts.get("upload", True) else {}
        return Update(
            upload, num_examples=len(self.data.train_index), metrics={"loss": float(np.mean(losses))}
        )

    def _epoch_rows(self, seed: int, server_round: int, epoch: int) -> np.ndarray:
        rng = epoch_rng(seed, self.market, server_round, epoch)
        seed_dropout(rng)  # before the permutation
        return rng.permutation(self.data.train_index)

    def _train_epoch(
        self,
        model: MMoE,
        optimizer: torch.optim.Optimizer,
        rows: np.ndarray,
        anchor: dict[str, torch.Tensor],
        mu: float,
    ) -> float:
        """One epoch of the shared loop (`fedmarket.methods.epochs.run_epoch`) over ``rows`` in order, with the
        proximal term towards ``anchor`` when ``mu`` > 0; the mean training loss."""

        def loss_fn(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor, int]:
            ctr_loss, ctcvr_loss = model.loss(*batch)
            loss = ctr_loss + ctcvr_loss
            return loss, loss, len(batch[0])

        proximal = Proximal.of(model, anchor, mu)
        return run_epoch(model, optimizer, self._batches(rows), loss_fn, proximal=proximal).mean

    def _batches(self, rows: np.ndarray) -> Iterator[tuple[torch.Tensor, ...]]:
        """(sparse, dense, click, CTCVR) of each batch of ``rows``, in order; batches of one row are skipped
        (BatchNorm needs two rows)."""
        d = self.data
        rows_t = torch.from_numpy(rows)
        n, bs = len(rows_t), self.batch_size
        chunk = bs * _GATHER_BATCHES
        for c in range(0, n, chunk):
            # _GATHER_BATCHES batches' rows gathered at once in permutation order; each batch is then a
            # contiguous slice (a view) of the chunk: the same rows in the same order as indexing every batch
            # separately (chunk is a multiple of the batch size), with one index op per chunk, not four per batch
            ci = rows_t[c : c + chunk]
            sparse, dense, click, ctcvr = d.sparse[ci], d.dense[ci], d.click[ci], d.ctcvr[ci]
            for s in range(0, len(ci), bs):
                e = min(s + bs, len(ci))
                if e - s < 2:  # BatchNorm needs two rows
                    continue
                yield sparse[s:e], dense[s:e], click[s:e], ctcvr[s:e]

    # ------------------------------------------------------------ evaluation
    @torch.inference_mode()
    def predict(self, rows: np.ndarray, model: MMoE | None = None) -> tuple[np.ndarray, np.ndarray]:
        model = model or self.model
        model.eval()
        d = self.data
        ctr, ctcvr = [], []
        for s in range(0, len(rows), 65536):
            idx = torch.from_numpy(rows[s : s + 65536])
            p_ctr, p_ctcvr = model.predict(d.sparse[idx], d.dense[idx])
            ctr.append(p_ctr)
            ctcvr.append(p_ctcvr)
        return torch.cat(ctr).numpy(), torch.cat(ctcvr).numpy()

    def _split_labels(self, market: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(click, CTCVR) labels of a scenario's split, gathered once: they are the same every round."""
        key = (market, split)
        if key not in self._labels:
            rows = self.data.views[market][split]
            self._labels[key] = (self.data.click[rows].numpy(), self.data.ctcvr[rows].numpy())
        return self._labels[key]

    @torch.no_grad()
    def evaluate(self, payload: Payload | None, split: str, full_ranking: bool = False) -> MarketMetrics:
        if payload:
            load_payload_into(self.model, payload)
        model = self.personal if self.personal is not None else self.model
        results: MarketMetrics = {}
        for market, view in self.data.views.items():
            metrics = self._metrics(market, split, model)
            if split == "test" and len(view.get("cold_test", ())):  # the cold-item report (protocol 2)
                metrics.update({f"cold_{k}": v for k, v in self._metrics(market, "cold_test", model).items()})
            results[market] = metrics
        return results

    def _metrics(self, market: str, split: str, model: MMoE) -> dict[str, float]:
        p_ctr, p_ctcvr = self.predict(self.data.views[market][split], model)
        click, conv = self._split_labels(market, split)
        ctr = ctr_metrics(click, p_ctr)
        ctcvr = ctr_metrics(conv, p_ctcvr)
        metrics = {
            "ctr_auc": ctr["auc"],
            "ctcvr_auc": ctcvr["auc"],
            "ctr_logloss": ctr["logloss"],
            "ctcvr_logloss": ctcvr["logloss"],
        }
        aucs = [a for a in (metrics["ctr_auc"], metrics["ctcvr_auc"]) if np.isfinite(a)]
        metrics["mean_auc"] = float(np.mean(aucs)) if aucs else float("nan")
        return metrics

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        if self.personal is not None:
            state["personal"] = self.personal.state_dict()
            state["personal_optimizer"] = self.personal_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "personal" in state:
            if self.personal is None:
                self.personal = copy.deepcopy(self.model)
                self.personal_optimizer = self._adam(self.personal)
            self.personal.load_state_dict(state["personal"])
            self.personal_optimizer.load_state_dict(state["personal_optimizer"])

    # ------------------------------------------------------------ export
    def export_model(self, market: str):
        """The model `evaluate` uses (Ditto's personal one when present) as a pairwise (user, item) model
        for serving; raises `fedmarket.serving.models.NotExportable` when impressions carry context features."""
        from fedmarket.serving.models import mtl_export

        model = self.personal if self.personal is not None else self.model
        return mtl_export(model, self.model_options, self.data, market)
