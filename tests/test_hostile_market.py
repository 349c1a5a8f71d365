"""A lying or broken market fails alone, on every aggregation path: the others' numbers are those of a run in
which that market simply failed."""

from __future__ import annotations

import numpy as np
import pytest

from fedmarket.api import protect
from fedmarket.config import config_from_dict
from fedmarket.data.split import leave_one_out
from fedmarket.data.synthetic import make_synthetic_markets
from fedmarket.federation.core import Update
from fedmarket.federation.runtime import Simulator
from fedmarket.methods import get_method

PATHS = {
    "mean": ({}, {}),
    "median": ({"aggregation": "median"}, {}),
    "trimmed_mean": ({"aggregation": "trimmed_mean", "trim_ratio": 0.25}, {}),
    "secure_sum": ({}, {"enabled": True}),
}
LIES = {
    "nan_count": lambda u: Update(u.payload, float("nan"), u.metrics),
    "inf_count": lambda u: Update(u.payload, float("inf"), u.metrics),
    "huge_count": lambda u: Update(u.payload, 10**12, u.metrics),
    "negative_count": lambda u: Update(u.payload, -5, u.metrics),
    "fractional_count": lambda u: Update(u.payload, 2.5, u.metrics),
    "undeclared_metric": lambda u: Update(
        u.payload, u.num_examples, {**u.metrics, "train_user_u0_last_item": 17.0}
    ),
}


@pytest.fixture(scope="module")
def splits():
    markets = make_synthetic_markets(4, [60, 50, 40, 45], 80, (8, 14), seed=1)
    return {n: leave_one_out(m, num_candidates=20, split_seed=1) for n, m in markets.items()}


def run(splits, path: str, lie=None):
    options, secagg = PATHS[path]
    cfg = config_from_dict(
        {
            "name": "h",
            "method": {"name": "fedavg", "options": options},
            "model": {"hidden": [16]},
            "train": {"rounds": 2, "batch_size": 256},
            "eval": {"candidates": 20, "full_ranking": False},
            "secure_aggregation": secagg,
            "progress": False,
        }
    )
    m = get_method("fedavg")
    trainers, strategy = m.build(cfg, m.parse_options(options), splits, 0)
    liar = trainers["m1"]
    fit = liar.fit

    def lying_fit(payload, config):
        if lie is None:
            raise RuntimeError("m1 is down")
        return lie(fit(payload, config))

    liar.fit = lying_fit
    trainers, strategy = protect(cfg, trainers, strategy, 0)
    return Simulator(trainers, strategy, m.declaration_for(cfg), rounds=2, seed=0, progress=False).run()


@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_lying_market_fails_alone_and_the_others_are_unchanged(splits, path):
    reference = run(splits, path)  # m1 simply fails every round
    for name, lie in LIES.items():
        result = run(splits, path, lie)
        assert {f["market"] for f in result.failures} == {"m1"}, name
        assert all(f["stage"] == "fit" for f in result.failures), name
        for market in ("m0", "m2", "m3"):
            for metric, value in reference.test[market].items():
                assert result.test[market][metric] == pytest.approx(value, abs=1e-12, nan_ok=True), (
                    name,
                    market,
                )
        assert not any("user_u0" in key for row in result.history for key in row)
        assert np.isfinite([v for m in ("m0", "m2") for v in result.test[m].values() if v == v]).all()


def test_quantisation_refuses_non_finite_values():
    from fedmarket.errors import PayloadError
    from fedmarket.federation.secagg import quantize

    with pytest.raises(PayloadError, match="NaN or infinite"):
        quantize(np.array([1.0, np.nan]))


@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_replayed_stale_upload_fails_that_market_alone(splits, path):
    """Round 2: m1 sends again exactly what it sent in round 1. It fails that round; the others' numbers are
    those of a run in which m1 was down in round 2."""
    sent = {}

    def replay(u):
        sent.setdefault("first", u)
        return sent["first"]

    def down_in_round_two(u):
        sent.setdefault("calls", 0)
        sent["calls"] += 1
        if sent["calls"] == 2:
            raise RuntimeError("m1 is down in round 2")
        return u

    result = run(splits, path, replay)
    assert [(f["market"], f["round"]) for f in result.failures] == [("m1", 2)]
    assert "replayed" in result.failures[0]["error"]
    sent.clear()
    reference = run(splits, path, down_in_round_two)
    for market in ("m0", "m2", "m3"):
        for metric, value in reference.test[market].items():
            assert result.test[market][metric] == pytest.approx(value, abs=1e-12, nan_ok=True), market


def test_personalised_aggregation_contains_a_lying_scenario():
    """PF-MSMTrec's personalised aggregation: a scenario that reports a NaN example count or an undeclared
    metric fails alone; the others' numbers are those of a run in which it simply failed."""
    from fedmarket.data import load_dataset
    from fedmarket.data.mtl import split_impressions

    markets = load_dataset(
        "synthetic-mtl",
        num_markets=3,
        users_per_market=40,
        items_per_market=60,
        interactions_per_user=(8, 15),
    )
    mtl_splits = {n: split_impressions(m) for n, m in markets.items()}
    cfg = config_from_dict(
        {
            "name": "p",
            "dataset": {"name": "synthetic-mtl"},
            "method": {"name": "pfmsmt"},
            "model": {"name": "mmoe", "embed_dim": 4, "hidden": [8], "tower_hidden": [4], "num_experts": 4},
            "train": {"rounds": 2, "batch_size": 256},
            "eval": {"select_metric": "mean_auc"},
            "progress": False,
        }
    )
    m = get_method("pfmsmt")
    liar_name = sorted(mtl_splits)[1]

    def run_pf(lie):
        trainers, strategy = m.build(cfg, m.parse_options({}), mtl_splits, 0)
        fit = trainers[liar_name].fit

        def lying(payload, config):
            if lie is None:
                raise RuntimeError("down")
            return lie(fit(payload, config))

        trainers[liar_name].fit = lying
        return Simulator(trainers, strategy, m.declaration_for(cfg), rounds=2, seed=0, progress=False).run()

    reference = run_pf(None)
    others = [n for n in mtl_splits if n != liar_name]
    for name in ("nan_count", "undeclared_metric", "huge_count"):
        result = run_pf(LIES[name])
        assert {f["market"] for f in result.failures} == {liar_name}, name
        for market in others:
            for metric, value in reference.test[market].items():
                assert result.test[market][metric] == pytest.approx(value, abs=1e-12, nan_ok=True), (
                    name,
                    market,
                )
