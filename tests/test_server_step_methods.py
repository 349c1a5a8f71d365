"""The server step (η_g, momentum β; `fedmarket.federation.strategies.server_step`) in every method whose
server averages parameters: the FedAvg-family CTR and multi-task baselines, FedMM's FedAvg rounds, and
PF-MSMTrec's personalised aggregation. Defaults leave each method as it was; the velocity is checkpointed."""

from __future__ import annotations

import numpy as np
import pytest

from fedmarket.config import config_from_dict
from fedmarket.data import load_dataset
from fedmarket.data.mtl import split_impressions
from fedmarket.data.prepare import prepare_data
from fedmarket.errors import ConfigError
from fedmarket.federation.core import Update
from fedmarket.federation.strategies import SECOND_MOMENT, ServerStep
from fedmarket.methods import get_method
from fedmarket.methods.fedmm import FedMMStrategy, Schedule
from fedmarket.methods.pfmsmt import PersonalizedStrategy

CTR = ("fedavg", "fedprox", "fedper")
MTL = ("mtl_fedavg", "mtl_fedavg_ft", "mtl_fedprox", "mtl_fedbn", "mtl_fedper", "mtl_ditto", "pfmsmt")


def _cfg(method: str, dataset: str, model: dict, options: dict) -> object:
    return config_from_dict(
        {
            "name": "t",
            "dataset": {"name": dataset},
            "method": {"name": method, "options": options},
            "model": model,
            "train": {"rounds": 2, "batch_size": 256},
            "progress": False,
        }
    )


@pytest.fixture(scope="module")
def ctr_splits():
    return prepare_data(_cfg("fedavg", "synthetic", {"name": "deepfm"}, {})).splits


@pytest.fixture(scope="module")
def mtl_splits():
    markets = load_dataset("synthetic-mtl", num_markets=2, users_per_market=20, items_per_market=30)
    return {n: split_impressions(m) for n, m in markets.items()}


@pytest.mark.parametrize("method", CTR + MTL)
def test_every_averaging_method_takes_the_server_step_options(method, ctr_splits, mtl_splits) -> None:
    mtl = method in MTL
    model = {"name": "mmoe", "num_experts": 4} if mtl else {"name": "deepfm"}
    m = get_method(method)
    adam = {"server_optimizer": "adam", "server_lr": 0.01, "server_momentum": 0.9, "server_beta2": 0.999}
    for raw, expected in (
        ({}, ServerStep()),
        ({"server_lr": 2.0, "server_momentum": 0.5}, ServerStep("sgd", 2.0, 0.5)),
        (adam, ServerStep("adam", 0.01, 0.9, 0.999, 1e-3)),
        ({"server_optimizer": "yogi", "server_tau": 1e-4}, ServerStep("yogi", 1.0, 0.0, 0.99, 1e-4)),
    ):
        cfg = _cfg(method, "synthetic-mtl" if mtl else "synthetic", model, raw)
        _, strategy = m.build(cfg, m.parse_options(raw), mtl_splits if mtl else ctr_splits, 0)
        assert strategy.server == expected
    for bad in (
        {"server_lr": 0.0},
        {"server_momentum": 1.0},
        {"server_momentum": -0.1},
        {"server_optimizer": "lamb"},
        {"server_beta2": 1.0},
        {"server_tau": 0.0},
        {"server_lr": float("nan")},
    ):
        with pytest.raises(ConfigError, match=f"method.options.{next(iter(bad))}"):
            m.parse_options(bad)


def _fedmm(**options) -> FedMMStrategy:
    opts = get_method("fedmm").parse_options({"rqvae_rounds": 1, **options})
    strategy = FedMMStrategy(opts, Schedule.from_options(opts, 5))  # round 1 embed, 2 RQ-VAE, 3-5 CTR
    strategy.initialize({"ctr.w": np.zeros(2, np.float32), "rqvae.encoder.w": np.zeros(1, np.float32)})
    return strategy


def test_fedmm_steps_its_fedavg_rounds_and_resumes_the_velocity() -> None:
    ups = {
        "a": Update({"ctr.w": np.array([1.0, 2.0], np.float32)}, 3),
        "b": Update({"ctr.w": np.array([5.0, 2.0], np.float32)}, 1),
    }  # weighted mean [2, 2]
    plain, stepped = _fedmm(), _fedmm(server_lr=2.0, server_momentum=0.5)
    for s in (plain, stepped):
        s.aggregate_train(3, ups)
    np.testing.assert_allclose(plain.state["ctr"]["ctr.w"], [2.0, 2.0])  # the defaults: the mean itself
    np.testing.assert_allclose(stepped.state["ctr"]["ctr.w"], [4.0, 4.0])  # θ + 2 (mean − θ)
    resumed = _fedmm(server_lr=2.0, server_momentum=0.5)
    resumed.load_state_dict(stepped.state_dict())
    for s in (stepped, resumed):  # v = 0.5 [2, 2] + ([2, 2] − [4, 4]) = [−1, −1]; θ = [4, 4] + 2 v
        s.aggregate_train(4, ups)
        np.testing.assert_allclose(s.state["ctr"]["ctr.w"], [2.0, 2.0])
    assert set(stepped.configure_train(5, ["a"])["a"]) == {"ctr.w"}  # the velocity never goes down
    old = plain.state_dict()
    del old["server_velocity"]  # a checkpoint written before the option
    _fedmm().load_state_dict(old)
    with pytest.raises(ConfigError, match="method.options.server_lr"):
        get_method("fedmm").parse_options({"server_lr": -1.0})
    adam = _fedmm(server_optimizer="adam", server_lr=0.1, server_momentum=0.9)
    adam.aggregate_train(3, ups)  # θ = 0 + 0.1 m / (√s + τ) with m = 0.1 Δ, s = 0.99 τ² + 0.01 Δ², Δ = [2, 2]
    m, s = 0.1 * 2.0, 0.99e-6 + 0.01 * 4.0
    np.testing.assert_allclose(adam.state["ctr"]["ctr.w"], 0.1 * m / (np.sqrt(s) + 1e-3), rtol=1e-6)
    assert set(adam.state_dict()["server_velocity"]["ctr"]) == {"ctr.w", SECOND_MOMENT + "ctr.w"}
    assert set(adam.configure_train(5, ["a"])["a"]) == {"ctr.w"}


def test_pfmsmt_steps_each_scenario_from_its_own_download() -> None:
    key = "towers.ctr.out.bias"
    ups = {
        "a": Update({key: np.array([1.0, 0.0], np.float32)}, 10),
        "b": Update({key: np.array([0.0, -1.0], np.float32)}, 10),
    }
    plain, stepped = PersonalizedStrategy(tau=0.5), PersonalizedStrategy(tau=0.5, server_lr=2.0)
    for s in (plain, stepped):
        s.initialize({key: np.full(2, 0.5, np.float32)})
        s.aggregate_train(1, ups)
    for m in ("a", "b"):  # θ̄_m ← download_m + 2 (aggregate_m − download_m), download = the initial model
        np.testing.assert_allclose(
            stepped.download(m)[key], 0.5 + 2 * (plain.download(m)[key] - 0.5), atol=1e-6
        )
    moving = PersonalizedStrategy(tau=0.5, server_momentum=0.5)
    moving.initialize({key: np.full(2, 0.5, np.float32)})
    moving.aggregate_train(1, ups)
    assert set(moving.state_dict()["server_velocity"]) == {"a", "b"} and not any(
        plain.state_dict()["server_velocity"].values()
    )
    resumed = PersonalizedStrategy(tau=0.5, server_momentum=0.5)
    resumed.load_state_dict(moving.state_dict())
    for s in (moving, resumed):
        s.aggregate_train(2, ups)
    for m in ("a", "b"):
        np.testing.assert_array_equal(moving.download(m)[key], resumed.download(m)[key])
    old = plain.state_dict()
    del old["server_velocity"]
    PersonalizedStrategy().load_state_dict(old)
    yogi = PersonalizedStrategy(tau=0.5, server_optimizer="yogi", server_lr=0.01)
    yogi.initialize({key: np.full(2, 0.5, np.float32)})
    yogi.aggregate_train(1, ups)
    for m in ("a", "b"):  # β₁ = 0: m = Δ, s = τ² + 0.01 Δ² (Δ² > τ²), θ = download + 0.01 Δ / (√s + τ)
        delta = plain.download(m)[key].astype(np.float64) - 0.5
        step = 0.01 * delta / (np.sqrt(1e-6 + 0.01 * delta**2) + 1e-3)
        np.testing.assert_allclose(yogi.download(m)[key], 0.5 + step, rtol=1e-5, atol=1e-7)
