"""Markets trained in worker processes (`ParallelTransport`) give exactly the serial runtime's run: the same
aggregates, validation rows, uploads, selected rounds and test metrics, bit for bit, for every method family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmarket.data import load_dataset
from fedmarket.data.mtl import split_impressions
from fedmarket.data.split import leave_one_out
from fedmarket.data.synthetic import make_synthetic_markets
from fedmarket.federation.payload import UploadDeclaration
from fedmarket.federation.runtime import ParallelTransport, Simulator
from fedmarket.federation.strategies import FedAvg
from fedmarket.methods import get_method
from tests import test_fecosr, test_item_features, test_pfmsmt_method


def _same(a, b) -> None:
    assert a.test == b.test
    assert a.selected_round == b.selected_round
    assert a.history == b.history
    assert a.uploads == b.uploads
    assert a.communication == b.communication
    assert not a.failures and not b.failures


@pytest.fixture(autouse=True)
def _one_thread():
    """The serial run with one torch thread, as each worker has (float sums depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _both(cfg, splits, select_metric: str, rounds: int = 2, workers: int = 2):
    m = get_method(cfg.method.name)
    out = []
    for parallel in (0, workers):
        trainers, strategy = m.build(cfg, m.parse_options(cfg.method.options), splits, 0)
        sim = Simulator(
            trainers,
            strategy,
            m.declaration_for(cfg),
            rounds=rounds,
            seed=0,
            select_metric=select_metric,
            progress=False,
            parallel_markets=parallel,
        )
        assert isinstance(sim.transport, ParallelTransport) == bool(parallel)
        out.append(sim.run())
        if parallel:  # the final states came back for export: each market at its selected round
            states = sim.transport.export_trainers()
            assert set(states) == set(splits)
    return out


@pytest.mark.parametrize("method", ["fedavg", "fedprox", "fedmm"])
def test_ctr_methods_in_parallel_equal_serial(method) -> None:
    markets = make_synthetic_markets(3, [60, 50, 40], 80, (8, 14), seed=1)
    splits = {n: leave_one_out(mk, num_candidates=20, split_seed=1) for n, mk in markets.items()}
    cfg = test_item_features._cfg(method, "none")
    serial, parallel = _both(cfg, splits, "auc", rounds=2)
    _same(serial, parallel)
    assert set(serial.test) == set(splits)
    assert all(np.isfinite(v).all() for m in serial.test.values() for v in m.values() if v == v)


def test_sequential_method_in_parallel_equals_serial() -> None:
    markets = make_synthetic_markets(3, [50, 40, 30], 60, (6, 14), with_text=True, seed=5)
    splits = {n: leave_one_out(m, num_candidates=20, split_seed=1) for n, m in markets.items()}
    serial, parallel = _both(test_fecosr.cfg_for("fecosr", 3, federated_rounds=2), splits, "ndcg@10", 3)
    _same(serial, parallel)


def test_multitask_method_in_parallel_equals_serial() -> None:
    markets = load_dataset(
        "synthetic-mtl",
        num_markets=3,
        users_per_market=40,
        items_per_market=60,
        interactions_per_user=(8, 15),
    )
    splits = {n: split_impressions(m) for n, m in markets.items()}
    serial, parallel = _both(test_pfmsmt_method._cfg("pfmsmt"), splits, "mean_auc")
    _same(serial, parallel)


def test_a_failing_market_fails_alone_in_a_worker() -> None:
    from tests.test_privacy import FixedDelta

    class Broken(FixedDelta):
        def fit(self, payload, config):
            raise RuntimeError("disk full")

    trainers = {
        "a": FixedDelta("a", [0.01, -0.01]),
        "b": Broken("b", [0.01, -0.01]),
        "c": FixedDelta("c", [0.0, 0.0]),
    }
    sim = Simulator(
        trainers, FedAvg(), UploadDeclaration(("w",)), rounds=2, progress=False, parallel_markets=2
    )
    result = sim.run()
    assert {f["market"] for f in result.failures} == {"b"}
    assert all("disk full" in f["error"] and f["stage"] == "fit" for f in result.failures)


def test_markets_are_spread_over_workers_by_their_workload() -> None:
    from fedmarket.federation.runtime import balance

    names, sizes = ["ca", "de", "in", "uk", "es"], [45, 17, 2, 31, 44]
    owner = balance(names, sizes, 2)  # largest first, each to the least loaded worker
    assert owner == {"ca": 0, "es": 1, "uk": 1, "de": 0, "in": 0}
    assert balance(["a", "b", "c"], [1, 1, 1], 2) == {"a": 0, "b": 1, "c": 0}  # alike: round robin
