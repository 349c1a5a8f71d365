"""The CPU speed-ups of the multi-task trainer change no number: the current `MTLClient` / `MMoE` against
the pre-speed-up reference kept in ``benchmarks/legacy_mtl.py`` (stacked expert mixing, per-tensor Adam,
per-batch indexing, per-round label gathering), bit for bit: parameters, optimizer state, BatchNorm
statistics, Ditto's personal model, losses and every evaluation metric."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmarket.data import load_dataset
from fedmarket.data.mtl import split_impressions
from fedmarket.federation.core import RoundConfig
from fedmarket.federation.payload import UploadDeclaration
from fedmarket.methods import mtl_trainer
from fedmarket.methods.mtl_trainer import MTLClient, MTLData
from fedmarket.models.mmoe import SEQUENTIAL_MIX_MAX, mix_experts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from legacy_mtl import LegacyMTLClient  # noqa: E402


def _stacked(gate, outs):
    return (gate.unsqueeze(-1) * torch.stack(outs, dim=1)).sum(1)


@pytest.mark.parametrize("experts", range(1, SEQUENTIAL_MIX_MAX + 3))
@pytest.mark.parametrize("hidden", [1, 3, 8, 16, 32, 33, 64])
def test_mix_experts_is_bitwise_the_stacked_sum(experts: int, hidden: int) -> None:
    for batch in (2, 7, 2048):
        g = torch.Generator().manual_seed(experts * 100 + hidden + batch)
        gate0 = torch.randn(batch, experts, generator=g).softmax(1)
        outs0 = [torch.randn(batch, hidden, generator=g) for _ in range(experts)]
        upstream = torch.randn(batch, hidden, generator=g)
        results = []
        for fn in (_stacked, mix_experts):
            gate = gate0.clone().requires_grad_()
            outs = [o.clone().requires_grad_() for o in outs0]
            mixed = fn(gate, outs)
            (mixed * upstream).sum().backward()
            results.append((mixed.detach(), gate.grad, [o.grad for o in outs]))
        (m0, g0, o0), (m1, g1, o1) = results
        assert torch.equal(m0, m1)
        assert torch.equal(g0, g1)
        assert all(torch.equal(a, b) for a, b in zip(o0, o1, strict=True))


@pytest.fixture(scope="module")
def scenario() -> MTLData:
    markets = load_dataset(
        "synthetic-mtl",
        num_markets=1,
        users_per_market=60,
        items_per_market=80,
        interactions_per_user=(8, 15),
    )
    return MTLData.from_split(split_impressions(next(iter(markets.values()))))


MODELS = {
    "template-esmm": dict(num_shared_experts=2, num_task_experts=1, num_scenario_experts=1),
    "mmoe-direct": dict(
        num_shared_experts=4, num_task_experts=0, num_scenario_experts=0, ctcvr_mode="direct"
    ),
    "no-bn": dict(num_shared_experts=1, num_task_experts=1, num_scenario_experts=1, batch_norm=False),
    "wide": dict(num_shared_experts=3, num_task_experts=2, num_scenario_experts=1, dropout=0.3),
}


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b, strict=True))
    return True  # optimizer hyper-parameters (``foreach`` differs by design)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("batch_size", [5, 64])
def test_trainer_matches_the_pre_speedup_reference_bitwise(scenario, model, batch_size, monkeypatch) -> None:
    monkeypatch.setattr(mtl_trainer, "_GATHER_BATCHES", 3)  # cross gather-chunk boundaries on small data
    n = len(scenario.train_index)
    if batch_size == 5:
        scenario = MTLData(**{**scenario.__dict__, "train_index": scenario.train_index[: n - n % 5 + 1]})
    options = {"embed_dim": 4, "expert_hidden": (16,), "tower_hidden": (8,), "dropout": 0.1, **MODELS[model]}
    upload = UploadDeclaration(("embedding.feat_*", "experts_shared.*", "towers.*"), "test")
    clients = [
        cls(
            "m",
            scenario,
            upload,
            model_options=options,
            lr=0.01,
            weight_decay=1e-4,
            batch_size=batch_size,
            seed=3,
        )
        for cls in (LegacyMTLClient, MTLClient)
    ]
    payload = clients[0].initial_payload()
    for server_round, opts in enumerate(
        [{}, {"proximal_mu": 0.1}, {"proximal_mu": 0.1, "ditto_lambda": 0.5}, {"ditto_lambda": 0.5}], start=1
    ):
        config = RoundConfig(round=server_round, local_epochs=1, seed=7, options=opts)
        updates = [c.fit(payload, config) for c in clients]
        assert updates[0].metrics == updates[1].metrics
        assert updates[0].payload.keys() == updates[1].payload.keys()
        assert all(np.array_equal(updates[0].payload[k], updates[1].payload[k]) for k in updates[0].payload)
        assert _state_equal(clients[0].state_dict(), clients[1].state_dict())
        for split in ("valid", "test"):
            assert clients[0].evaluate(None, split) == clients[1].evaluate(None, split)
        payload = {k: np.asarray(v) * 0.9 for k, v in updates[0].payload.items()}  # a "server" change
    (view,) = scenario.views.values()
    probs = [c.predict(view["test"]) for c in clients]
    assert all(np.array_equal(a, b) for a, b in zip(probs[0], probs[1], strict=True))
