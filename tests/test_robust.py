"""Robust aggregation against one poisoned market (ATTACK SIMULATION), end to end through the runtime."""

import numpy as np
import pytest

from fedmarket.config import config_from_dict
from fedmarket.errors import ConfigError
from fedmarket.federation.attacks import poison_markets, poison_payload
from fedmarket.federation.core import ClientTrainer, Update
from fedmarket.federation.payload import UploadDeclaration
from fedmarket.federation.runtime import Simulator
from fedmarket.federation.strategies import FedAvg


class Quadratic(ClientTrainer):
    """One gradient step toward a common optimum; the metric is minus the distance to it."""

    optimum = np.array([1.0, -2.0, 0.5])

    def __init__(self, market):
        self.market = market
        self.w = np.zeros(3)

    def initial_payload(self):
        return {"w": self.w.copy()}

    def fit(self, payload, config):
        self.w = payload["w"].copy() if payload else self.w
        self.w = self.w + 0.5 * (self.optimum - self.w)
        return Update({"w": self.w.copy()}, num_examples=10)

    def evaluate(self, payload, split, full_ranking=False):
        if payload:
            self.w = payload["w"].copy()
        return {self.market: {"auc": float(-np.linalg.norm(self.w - self.optimum))}}

    def state_dict(self):
        return {"w": self.w.copy()}

    def load_state_dict(self, state):
        self.w = state["w"].copy()


def test_poison_kinds():
    down, up = {"w": np.array([1.0, 1.0])}, {"w": np.array([2.0, 0.0])}
    rng = np.random.default_rng(0)
    assert poison_payload(up, down, "scale", 3.0, rng)["w"] == pytest.approx([4.0, -2.0])
    assert poison_payload(up, down, "sign_flip", 2.0, rng)["w"] == pytest.approx([-1.0, 3.0])
    noisy = poison_payload({"w": np.zeros(10_000)}, {"w": np.zeros(10_000)}, "noise", 5.0, rng)["w"]
    assert noisy.std() == pytest.approx(5.0, rel=0.05)


def final_distance(aggregation, attack="sign_flip", **kw):
    trainers = {m: Quadratic(m) for m in "abcdefgh"}
    # scale 40: a boosted update big enough to make the mean overshoot (scale 10 still converges here)
    trainers = poison_markets(trainers, ["c"], attack, 40.0 if attack == "scale" else 10.0)
    sim = Simulator(
        trainers,
        FedAvg(aggregation=aggregation, **kw),
        UploadDeclaration(("w",)),
        rounds=8,
        select="last",
        progress=False,
    )
    result = sim.run()
    return -np.mean([v["auc"] for m, v in result.test.items() if m != "c"])


@pytest.mark.parametrize("attack", ["scale", "sign_flip", "noise"])
def test_median_and_trimmed_mean_resist_one_poisoned_market(attack):
    clean = Quadratic.optimum
    damaged = final_distance("mean", attack)
    assert damaged > 1.0  # FedAvg is wrecked by one market in eight
    assert final_distance("median", attack) < 0.05 * np.linalg.norm(clean)
    assert final_distance("trimmed_mean", attack, trim_ratio=0.2) < 0.05 * np.linalg.norm(clean)


def test_attack_config_is_validated():
    with pytest.raises(ConfigError, match="attack.kind"):
        config_from_dict({"attack": {"markets": ["uk"], "kind": "backdoor"}})
    with pytest.raises(ConfigError, match="attack.scale"):
        config_from_dict({"attack": {"markets": ["uk"], "scale": 0.0}})
    assert config_from_dict({}).attack.markets == []


class Misbehaving(Quadratic):
    """Uploads a wrong shape in round 2 and an extra key in round 3."""

    def fit(self, payload, config):
        update = super().fit(payload, config)
        if config.round == 2:
            return Update({"w": np.zeros(4)}, 10)
        if config.round == 3:
            return Update({**update.payload, "user_ids": np.arange(3.0)}, 10)
        return update


def test_bad_uploads_are_rejected_with_a_reason_and_the_round_goes_on():
    trainers = {"a": Quadratic("a"), "b": Quadratic("b"), "bad": Misbehaving("bad")}
    sim = Simulator(trainers, FedAvg(), UploadDeclaration(("w",)), rounds=4, progress=False)
    result = sim.run()
    reasons = {f["round"]: f["error"] for f in result.failures}
    assert set(reasons) == {2, 3}
    assert "shape" in reasons[2] and "undeclared" in reasons[3]
    assert result.communication["bad"]["rounds"] == 2 and result.communication["a"]["rounds"] == 4
    assert all(u["market"] != "bad" for u in result.uploads if u["round"] in (2, 3))
