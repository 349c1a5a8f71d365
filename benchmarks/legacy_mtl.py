"""The multi-task trainer's hot paths as they were before the CPU speed-ups (commit 1d10a9d), kept as the
reference that `benchmarks/mtl_throughput.py` times against and `tests/test_mtl_perf_equivalence.py` checks
bit for bit. Not used by any method.

Differences from the current `fedmarket.methods.mtl_trainer.MTLClient` / `fedmarket.models.mmoe.MMoE`:
the experts are mixed with ``torch.stack`` + a broadcast product + ``sum``; Adam runs its per-tensor Python
loop (``foreach=False``, PyTorch's CPU default); every batch indexes the scenario tensors with its own rows;
evaluation re-gathers the labels of the split every round.
"""

from __future__ import annotations

import numpy as np
import torch

from fedmarket.eval.metrics import ctr_metrics
from fedmarket.federation.core import MarketMetrics
from fedmarket.federation.payload import Payload, load_payload_into
from fedmarket.methods.mtl_trainer import MTLClient
from fedmarket.models.mmoe import MMoE


class LegacyMMoE(MMoE):
    def forward(self, sparse, dense=None):
        x = self.inputs(sparse, dense)
        common = [e(x) for e in self.experts_shared]
        scenario = [e(x) for e in self.experts_scenario]
        logits = []
        for task in self.tower_tasks:
            outs = torch.stack(common + [e(x) for e in self.experts_task[task]] + scenario, dim=1)
            gate = torch.softmax(self.gates[task](x), dim=1)
            logits.append(self.towers[task]((gate.unsqueeze(-1) * outs).sum(1)))
        return logits[0], logits[1]


def _legacy_adam(model: MMoE, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)


class LegacyMTLClient(MTLClient):
    """`MTLClient` with the pre-speed-up model forward, optimizer, batching and evaluation."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model.__class__ = LegacyMMoE
        self.optimizer = _legacy_adam(self.model, self.lr, self.weight_decay)

    def _adam(self, model: MMoE) -> torch.optim.Optimizer:
        return _legacy_adam(model, self.lr, self.weight_decay)

    def _train_epoch(self, model, optimizer, rows, anchor, mu) -> float:
        d = self.data
        model.train()
        params = dict(model.named_parameters())
        tied = [(params[k], a) for k, a in anchor.items() if k in params]
        total, count = 0.0, 0
        rows_t = torch.from_numpy(rows)
        for s in range(0, len(rows_t), self.batch_size):
            idx = rows_t[s : s + self.batch_size]
            if len(idx) < 2:  # BatchNorm needs two rows
                continue
            ctr_loss, ctcvr_loss = model.loss(d.sparse[idx], d.dense[idx], d.click[idx], d.ctcvr[idx])
            loss = ctr_loss + ctcvr_loss
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            if tied and mu > 0:
                loss = loss + 0.5 * mu * sum((p - a).pow(2).sum() for p, a in tied)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return total / max(1, count)

    @torch.no_grad()
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

    @torch.no_grad()
    def evaluate(self, payload: Payload | None, split: str, full_ranking: bool = False) -> MarketMetrics:
        if payload:
            load_payload_into(self.model, payload)
        model = self.personal if self.personal is not None else self.model
        results: MarketMetrics = {}
        for market, view in self.data.views.items():
            rows = view[split]
            p_ctr, p_ctcvr = self.predict(rows, model)
            ctr = ctr_metrics(self.data.click[rows].numpy(), p_ctr)
            ctcvr = ctr_metrics(self.data.ctcvr[rows].numpy(), p_ctcvr)
            metrics = {
                "ctr_auc": ctr["auc"],
                "ctcvr_auc": ctcvr["auc"],
                "ctr_logloss": ctr["logloss"],
                "ctcvr_logloss": ctcvr["logloss"],
            }
            metrics["mean_auc"] = float(np.nanmean([metrics["ctr_auc"], metrics["ctcvr_auc"]]))
            results[market] = metrics
        return results
