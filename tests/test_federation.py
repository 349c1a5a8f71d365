"""Federation core: aggregators, upload checks, the runtime's failure handling and resume."""

import numpy as np
import pytest

from fedmarket.errors import PayloadError
from fedmarket.federation.aggregators import coordinate_median, trimmed_mean, weighted_mean
from fedmarket.federation.core import ClientTrainer, RoundConfig, Update
from fedmarket.federation.payload import UploadDeclaration, payload_bytes, validate_update
from fedmarket.federation.runtime import Simulator
from fedmarket.federation.strategies import FedAvg


def test_weighted_mean_matches_hand_computation():
    a = {"w": np.array([1.0, 2.0], dtype=np.float32)}
    b = {"w": np.array([3.0, 6.0], dtype=np.float32)}
    out = weighted_mean([a, b], [1, 3])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    assert out["w"].dtype == np.float32


def test_weighted_mean_rejects_bad_weights():
    with pytest.raises(ValueError):
        weighted_mean([{"w": np.zeros(1)}], [0])


def test_server_lr_moves_the_global_state_eta_times_towards_the_mean():
    def update(w, n):
        return Update({"w": np.array(w, dtype=np.float32), "step": np.array([7], dtype=np.int64)}, n)

    plain, fast = FedAvg(), FedAvg(server_lr=2.0)
    start = {"w": np.array([1.0, 1.0], dtype=np.float32), "step": np.array([0], dtype=np.int64)}
    for strategy in (plain, fast):
        strategy.initialize(start)
        strategy.aggregate_train(1, {"a": update([2.0, 3.0], 1), "b": update([4.0, 7.0], 3)})
    # mean = [3.5, 6]; plain FedAvg takes it, η_g = 2 goes twice as far from [1, 1]
    np.testing.assert_allclose(plain.global_payload["w"], [3.5, 6.0])
    np.testing.assert_allclose(fast.global_payload["w"], [6.0, 11.0])
    assert fast.global_payload["w"].dtype == np.float32
    assert fast.global_payload["step"].tolist() == [7]  # integer buffers are taken as aggregated
    with pytest.raises(ValueError, match="server_lr"):
        FedAvg(server_lr=0)


def test_server_momentum_accumulates_the_mean_steps_and_resumes_exactly():
    def update(w):
        return Update({"w": np.array(w, dtype=np.float32), "step": np.array([7], dtype=np.int64)}, 1)

    start = {"w": np.array([0.0, 0.0], dtype=np.float32), "step": np.array([0], dtype=np.int64)}
    m = FedAvg(server_lr=0.5, server_momentum=0.9)
    m.initialize(start)
    m.aggregate_train(1, {"a": update([1.0, 2.0])})  # v = [1, 2], θ = 0.5 v = [0.5, 1]
    np.testing.assert_allclose(m.global_payload["w"], [0.5, 1.0])
    saved = m.state_dict()
    assert saved["server_velocity"] and not FedAvg().state_dict()["server_velocity"]  # β = 0 keeps none
    resumed = FedAvg(server_lr=0.5, server_momentum=0.9)
    resumed.load_state_dict(saved)
    for s in (m, resumed):  # v = 0.9 [1, 2] + ([1, 2] − [0.5, 1]) = [1.4, 2.8]; θ = [0.5, 1] + 0.5 v
        s.aggregate_train(2, {"a": update([1.0, 2.0])})
        np.testing.assert_allclose(s.global_payload["w"], [1.2, 2.4], rtol=1e-6)
        assert s.global_payload["step"].tolist() == [7]
    # β = 0 is the plain server step, and what markets download never carries the velocity
    plain, zero = FedAvg(server_lr=0.5), FedAvg(server_lr=0.5, server_momentum=0.0)
    for s in (plain, zero):
        s.initialize(start)
        s.aggregate_train(1, {"a": update([1.0, 2.0])})
        s.aggregate_train(2, {"a": update([1.0, 2.0])})
    np.testing.assert_array_equal(plain.global_payload["w"], zero.global_payload["w"])
    assert set(m.configure_train(3, ["a"])["a"]) == {"w", "step"}
    with pytest.raises(ValueError, match="server_momentum"):
        FedAvg(server_momentum=1.0)


def test_fedadam_and_fedyogi_match_the_hand_computation_and_resume_exactly():
    def update(w):
        return Update({"w": np.array(w, dtype=np.float32), "step": np.array([7], dtype=np.int64)}, 1)

    start = {"w": np.array([0.0, 0.0], dtype=np.float32), "step": np.array([0], dtype=np.int64)}
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    # round 2: the first coordinate's Δ is tiny (Δ² < s: yogi's s barely moves, adam's decays by β₂), the
    # second's is large (Δ² > s: both grow s)
    rounds = [[1.0, -2000.0], [0.1, -2000.0]]
    for name in ("adam", "yogi"):
        opts = dict(server_optimizer=name, server_lr=lr, server_momentum=b1, server_beta2=b2, server_tau=tau)
        strategy = FedAvg(**opts)
        strategy.initialize(start)
        theta, m, s = np.zeros(2), np.zeros(2), np.full(2, tau**2)
        for r, w in enumerate(rounds, start=1):
            if r == 2:  # resume from the checkpoint before the second round
                saved, strategy = strategy.state_dict(), FedAvg(**opts)
                strategy.load_state_dict(saved)
            strategy.aggregate_train(r, {"a": update(w)})
            delta = np.array(w, np.float64) - theta
            if r == 2:
                assert s[0] > delta[0] ** 2 and s[1] < delta[1] ** 2  # both of yogi's branches are taken
            m = b1 * m + (1 - b1) * delta
            if name == "adam":
                s = b2 * s + (1 - b2) * delta**2
            else:
                s = s - (1 - b2) * delta**2 * np.sign(s - delta**2)
            theta = theta + lr * m / (np.sqrt(s) + tau)
            np.testing.assert_allclose(strategy.global_payload["w"], theta, rtol=1e-5)
            assert strategy.global_payload["step"].tolist() == [7]
            assert set(strategy.configure_train(r + 1, ["a"])["a"]) == {"w", "step"}  # no moments go down
        # the first step is ≈ η per coordinate whatever the scale of Δ (1 and −2000 here)
        if name == "adam":
            first = FedAvg(**opts)
            first.initialize(start)
            first.aggregate_train(1, {"a": update(rounds[0])})
            np.testing.assert_allclose(np.abs(first.global_payload["w"]), lr, rtol=0.02)
    with pytest.raises(ValueError, match="server_optimizer"):
        FedAvg(server_optimizer="lamb")
    with pytest.raises(ValueError, match="server_tau"):
        FedAvg(server_optimizer="adam", server_tau=0.0)


def test_robust_aggregators_ignore_one_outlier():
    honest = [{"w": np.array([1.0, 1.0])} for _ in range(4)]
    poisoned = honest + [{"w": np.array([1e6, -1e6])}]
    np.testing.assert_allclose(coordinate_median(poisoned)["w"], [1.0, 1.0])
    np.testing.assert_allclose(trimmed_mean(poisoned, 0.2)["w"], [1.0, 1.0])
    assert abs(weighted_mean(poisoned, [1] * 5)["w"][0]) > 1e5


def test_declaration_rejects_undeclared_keys():
    decl = UploadDeclaration(("dnn.*", "head.*"))
    decl.check({"dnn.0.weight": np.zeros(2)}, "de")
    with pytest.raises(PayloadError, match="features.embedding.item.weight"):
        decl.check({"dnn.0.weight": np.zeros(2), "features.embedding.item.weight": np.zeros(2)}, "de")


def test_validate_update_rejects_nan_and_shapes():
    ref = {"w": np.zeros(3)}
    with pytest.raises(PayloadError, match="NaN"):
        validate_update({"w": np.array([0.0, np.nan, 0.0])}, ref, "jp")
    with pytest.raises(PayloadError, match="shape"):
        validate_update({"w": np.zeros(4)}, ref, "jp")
    with pytest.raises(PayloadError, match="unexpected"):
        validate_update({"w": np.zeros(3), "x": np.zeros(1)}, ref, "jp")


class ToyTrainer(ClientTrainer):
    """Moves its weight toward a market-specific target; the metric is minus the distance."""

    def __init__(self, market, target, fail_round=None, nan_round=None):
        self.market = market
        self.target = np.asarray(target, dtype=np.float64)
        self.w = np.zeros_like(self.target)
        self.fail_round = fail_round
        self.nan_round = nan_round

    def initial_payload(self):
        return {"w": self.w.copy()}

    def fit(self, payload, config: RoundConfig):
        if config.round == self.fail_round:
            raise RuntimeError("disk full")
        if payload:
            self.w = payload["w"].copy()
        rng = np.random.default_rng([config.seed, config.round, hash(self.market) % 1000])
        self.w = self.w + 0.5 * (self.target - self.w) + rng.normal(0, 0.01, self.w.shape)
        out = {"w": self.w.copy()}
        if config.round == self.nan_round:
            out["w"][0] = np.nan
        return Update(out, num_examples=10)

    def evaluate(self, payload, split, full_ranking=False):
        if payload:
            self.w = payload["w"].copy()
        return {self.market: {"auc": float(-np.abs(self.w - self.target).sum())}}

    def state_dict(self):
        return {"w": self.w.copy()}

    def load_state_dict(self, state):
        self.w = state["w"].copy()


def make_sim(tmp_path=None, fail_round=None, nan_round=None, rounds=4):
    trainers = {
        "a": ToyTrainer("a", [1.0, 0.0]),
        "b": ToyTrainer("b", [0.0, 1.0], fail_round=fail_round, nan_round=nan_round),
        "c": ToyTrainer("c", [1.0, 1.0]),
    }
    return Simulator(
        trainers,
        FedAvg(),
        UploadDeclaration(("w",)),
        rounds=rounds,
        seed=3,
        checkpoint_path=None if tmp_path is None else tmp_path / "ckpt.ckpt",
        progress=False,
    )


def test_failing_market_does_not_stop_the_run():
    result = make_sim(fail_round=2).run()
    assert [(f["round"], f["market"]) for f in result.failures] == [(2, "b")]
    assert "disk full" in result.failures[0]["error"]
    assert result.communication["b"]["rounds"] == 3
    assert result.communication["a"]["rounds"] == 4
    assert set(result.test) == {"a", "b", "c"}


def test_nan_upload_is_rejected_and_the_round_goes_on():
    result = make_sim(nan_round=3).run()
    assert [(f["round"], f["market"]) for f in result.failures] == [(3, "b")]
    assert "NaN" in result.failures[0]["error"]


def test_byte_accounting():
    result = make_sim().run()
    per_round = payload_bytes({"w": np.zeros(2)})
    assert result.communication["a"] == {"up_bytes": 4 * per_round, "down_bytes": 4 * per_round, "rounds": 4}


def test_resume_equals_uninterrupted(tmp_path):
    full = make_sim(tmp_path / "full").run()

    class Killed(Exception):
        pass

    sim = make_sim(tmp_path / "killed")
    original = sim.run_round

    def dying(server_round):
        if server_round == 3:
            raise Killed
        original(server_round)

    sim.run_round = dying
    with pytest.raises(Killed):
        sim.run()
    resumed = make_sim(tmp_path / "killed").run(resume=True)
    assert resumed.test == full.test
    assert resumed.communication == full.communication
