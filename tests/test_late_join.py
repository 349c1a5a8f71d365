"""Late join and leave (`train.join`, `train.leave`): a market that joins a running federation gets the
current shared state and takes part from its round on, the others are not restarted; a market that leaves
keeps its best round for the test; the participation record says who took part in which round."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmarket.config import config_from_dict
from fedmarket.data import load_dataset
from fedmarket.data.mtl import split_impressions
from fedmarket.data.split import leave_one_out
from fedmarket.data.synthetic import make_synthetic_markets
from fedmarket.errors import ConfigError
from fedmarket.federation.runtime import Simulator
from fedmarket.methods import get_method
from tests import test_fecosr, test_item_features, test_pfmsmt_method


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ctr_splits():
    markets = make_synthetic_markets(3, [60, 50, 40], 80, (8, 14), seed=1)
    return {n: leave_one_out(mk, num_candidates=20, split_seed=1) for n, mk in markets.items()}


def _run(cfg, splits, rounds, select_metric="auc", resume=False, **settings):
    m = get_method(cfg.method.name)
    trainers, strategy = m.build(cfg, m.parse_options(cfg.method.options), splits, 0)
    sim = Simulator(
        trainers,
        strategy,
        m.declaration_for(cfg),
        rounds=rounds,
        seed=0,
        select_metric=select_metric,
        progress=False,
        **settings,
    )
    return sim.run(resume=resume), sim


def _rounds_of(result, market):
    return sorted({h["round"] for h in result.history if h["market"] == market})


def test_a_newcomer_takes_part_from_its_round_and_the_others_are_not_restarted(ctr_splits) -> None:
    cfg = test_item_features._cfg("fedavg", "none")
    names = list(ctr_splits)
    newcomer = names[-1]
    late, sim = _run(cfg, ctr_splits, 4, join={newcomer: 3})
    assert not late.failures
    assert _rounds_of(late, newcomer) == [3, 4]
    assert late.communication[newcomer]["rounds"] == 2
    assert newcomer in late.test and late.selected_round[newcomer] >= 3
    assert [p["round"] for p in late.participation] == [1, 2, 3, 4]
    assert late.participation[1]["markets"] == names[:-1]
    assert late.participation[2]["joined"] == [newcomer] and late.participation[2]["markets"] == names
    # its first download is the global model the others got that round (shared parts; its IDs start fresh)
    first = [u for u in late.uploads if u["market"] == newcomer][0]
    other = [u for u in late.uploads if u["market"] == names[0] and u["round"] == 3][0]
    assert first["round"] == 3 and first["down_bytes"] == other["down_bytes"] > 0
    # rounds 1-2 are exactly the run of the first two markets alone: nobody was restarted
    alone, _ = _run(cfg, {n: ctr_splits[n] for n in names[:-1]}, 2)
    early = [h for h in late.history if h["round"] <= 2]
    assert early == alone.history


def test_a_market_that_leaves_keeps_its_best_round(ctr_splits) -> None:
    cfg = test_item_features._cfg("fedavg", "none")
    names = list(ctr_splits)
    result, _ = _run(cfg, ctr_splits, 4, leave={names[0]: 2})
    assert _rounds_of(result, names[0]) == [1, 2]
    assert result.selected_round[names[0]] <= 2 and names[0] in result.test
    assert result.participation[2]["left"] == [names[0]]
    assert names[0] not in result.participation[3]["markets"]


def test_late_join_resumes_to_the_same_numbers(ctr_splits, tmp_path) -> None:
    cfg = test_item_features._cfg("fedavg", "none")
    newcomer = list(ctr_splits)[-1]
    whole, _ = _run(cfg, ctr_splits, 4, join={newcomer: 3})
    ckpt = tmp_path / "seed0.ckpt"
    _run(cfg, ctr_splits, 3, join={newcomer: 3}, checkpoint_path=ckpt)
    resumed, _ = _run(cfg, ctr_splits, 4, join={newcomer: 3}, checkpoint_path=ckpt, resume=True)
    assert resumed.test == whole.test and resumed.history == whole.history


def test_fine_tuning_newcomer_downloads_the_global_model_once() -> None:
    """FedAvg + fine-tune (sequential): a market that joins in the fine-tuning phase, where nobody downloads
    anything, gets the final global model with its first round and nothing afterwards."""
    markets = make_synthetic_markets(3, [50, 40, 30], 60, (6, 14), with_text=True, seed=5)
    splits = {n: leave_one_out(m, num_candidates=20, split_seed=1) for n, m in markets.items()}
    newcomer = list(splits)[-1]
    cfg = test_fecosr.cfg_for("fecosr", 5, federated_rounds=2)
    result, _ = _run(cfg, splits, 5, "ndcg@10", join={newcomer: 4})
    assert not result.failures
    mine = {u["round"]: u for u in result.uploads if u["market"] == newcomer}
    others = [u for u in result.uploads if u["market"] != newcomer and u["round"] >= 4]
    assert sorted(mine) == [4, 5]
    assert mine[4]["down_bytes"] > 0 and mine[4]["bytes"] == 0 and mine[5]["down_bytes"] == 0
    assert all(u["down_bytes"] == 0 for u in others)
    assert _rounds_of(result, newcomer) == [4, 5] and newcomer in result.test


def test_fedmm_newcomer_in_the_ctr_phase_gets_the_codebook_and_fits_its_own() -> None:
    markets = make_synthetic_markets(3, [60, 50, 40], 80, (8, 14), seed=1)
    splits = {n: leave_one_out(mk, num_candidates=20, split_seed=1) for n, mk in markets.items()}
    newcomer = list(splits)[-1]
    cfg = config_from_dict(
        {
            "name": "t",
            "method": {
                "name": "fedmm",
                "options": {"rqvae_rounds": 1, "rqvae_epochs": 2, "embedding_epochs": 2},
            },
            "model": {"name": "deepfm"},
            "train": {"rounds": 5},
            "eval": {"candidates": 20},
            "progress": False,
        }
    )
    result, sim = _run(cfg, splits, 5, join={newcomer: 4})
    assert not result.failures, result.failures
    assert _rounds_of(result, newcomer) == [4, 5]
    assert "auc" in result.test[newcomer]
    mine = [u for u in result.uploads if u["market"] == newcomer]
    first_other = [u for u in result.uploads if u["round"] == 4 and u["market"] != newcomer][0]
    assert mine[0]["down_bytes"] > first_other["down_bytes"]  # the codebook and autoencoder came too
    client = sim.transport.export_trainers()[newcomer]
    g = sim.strategy.state["rqvae"]  # the federation's global codebook, kept as is by the newcomer
    book = [k for k in g if k.endswith("global_codebook")][0]
    assert np.array_equal(client.rqvae.global_codebook.detach().numpy(), g[book])


def test_pfmsmt_newcomer_starts_from_the_mean_personalised_model() -> None:
    markets = load_dataset(
        "synthetic-mtl",
        num_markets=3,
        users_per_market=40,
        items_per_market=60,
        interactions_per_user=(8, 15),
    )
    splits = {n: split_impressions(m) for n, m in markets.items()}
    newcomer = list(splits)[-1]
    cfg = test_pfmsmt_method._cfg("pfmsmt", rounds=3)
    m = get_method("pfmsmt")
    trainers, strategy = m.build(cfg, m.parse_options(cfg.method.options), splits, 0)
    sim = Simulator(
        trainers,
        strategy,
        m.declaration_for(cfg),
        rounds=3,
        seed=0,
        select_metric="mean_auc",
        progress=False,
        join={newcomer: 3},
    )
    seen = {}
    admit = strategy.admit

    def spy(market, server_round):
        before = {
            k: np.mean([np.asarray(p[k], np.float64) for p in strategy.personal.values()], axis=0)
            for k in next(iter(strategy.personal.values()))
        }
        admit(market, server_round)
        seen[market] = (before, strategy.personal[market])

    strategy.admit = spy
    result = sim.run()
    assert not result.failures
    before, given = seen[newcomer]
    assert all(np.allclose(before[k], given[k], atol=1e-6) for k in before)
    assert _rounds_of(result, newcomer) == [3]


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"rounds": 4, "join": {"a": 5}}, "train.join.a must be a round in 1..train.rounds=4"),
        ({"rounds": 4, "join": {"a": 3}, "leave": {"a": 2}}, "train.leave.a=2 is before its join round 3"),
        ({"rounds": 4, "leave": {"a": "x"}}, "train.leave.a must be a round"),
    ],
)
def test_bad_join_and_leave_are_named(train, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"name": "t", "method": {"name": "fedavg"}, "train": train})


def test_unknown_joining_market_is_named(tmp_path) -> None:
    from fedmarket.api import run_experiment

    cfg = config_from_dict(
        {
            "name": "t",
            "dataset": {"name": "synthetic", "options": {"num_markets": 2}},
            "method": {"name": "fedavg"},
            "train": {"rounds": 2, "join": {"atlantis": 2}},
            "output_dir": str(tmp_path),
            "progress": False,
        }
    )
    with pytest.raises(ConfigError, match=r"train.join: unknown markets \['atlantis'\]"):
        run_experiment(cfg)
