"""Client-level DP: the accountant against dp-accounting, clipping, noise scale, target-ε stopping."""

import numpy as np
import pytest

from fedmarket.config import config_from_dict
from fedmarket.errors import ConfigError
from fedmarket.federation.core import ClientTrainer, RoundConfig, Update
from fedmarket.federation.payload import UploadDeclaration
from fedmarket.federation.privacy import (
    DEFAULT_ORDERS,
    DPSettings,
    PrivateClient,
    RDPAccountant,
    clip_delta,
    global_norm,
    rdp_sampled_gaussian,
    wrap_private,
)
from fedmarket.federation.runtime import Simulator
from fedmarket.federation.strategies import FedAvg

# ε at δ = 1e-5 from dp-accounting 0.6.0 (RdpAccountant with DEFAULT_ORDERS, Poisson-sampled Gaussian),
# computed once so this test runs without the package: (q, σ, steps) -> ε
DP_ACCOUNTING_EPSILONS = {
    (1.0, 1.1, 10): 17.198385694918926,
    (0.1, 1.0, 100): 7.972921510380539,
    (0.5, 0.8, 20): 23.408034292281812,
    (1.0, 2.0, 50): 22.626631103850336,
}


@pytest.mark.parametrize("key", sorted(DP_ACCOUNTING_EPSILONS))
def test_accountant_matches_dp_accounting(key):
    q, sigma, steps = key
    acc = RDPAccountant()
    acc.step(q, sigma, count=steps)
    assert acc.epsilon(1e-5) == pytest.approx(DP_ACCOUNTING_EPSILONS[key], rel=1e-6)


def test_accountant_matches_installed_dp_accounting():
    dp = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import rdp_privacy_accountant

    for q, sigma, steps in [(0.25, 1.3, 40), (1.0, 0.7, 5), (0.02, 0.9, 1000)]:
        ref = rdp_privacy_accountant.RdpAccountant(list(DEFAULT_ORDERS))
        event = (
            dp.GaussianDpEvent(sigma) if q == 1 else dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(sigma))
        )
        ref.compose(dp.SelfComposedDpEvent(event, steps))
        acc = RDPAccountant()
        acc.step(q, sigma, count=steps)
        assert acc.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-6)


def test_rdp_properties():
    orders = [2, 4, 8, 16]
    full = rdp_sampled_gaussian(1.0, 1.5, orders)
    assert full == pytest.approx([a / (2 * 1.5**2) for a in orders])
    # sub-sampling amplifies; the binomial formula tends to the closed form as q -> 1
    assert (rdp_sampled_gaussian(0.1, 1.5, orders) < full).all()
    assert rdp_sampled_gaussian(1 - 1e-12, 1.5, orders) == pytest.approx(full, rel=1e-6)
    assert np.isinf(rdp_sampled_gaussian(1.0, 0.0, orders)).all()
    # more noise, fewer steps -> smaller ε
    a, b = RDPAccountant(), RDPAccountant()
    a.step(1.0, 1.0, 10)
    b.step(1.0, 2.0, 10)
    assert b.epsilon(1e-5) < a.epsilon(1e-5)


@pytest.mark.parametrize("clipping", ["flat", "per_key"])
def test_clipping_bound_holds(clipping):
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0, 100.0):
        delta = {"a": rng.normal(0, scale, (30, 4)), "b": rng.normal(0, scale * 10, 7)}
        clipped, norm = clip_delta(delta, 1.5, clipping)
        assert norm == pytest.approx(global_norm(delta))
        assert global_norm(clipped) <= 1.5 * (1 + 1e-9)
        if norm <= 1.5 / np.sqrt(2):  # below every bound: untouched
            assert all(np.array_equal(clipped[k], delta[k]) for k in delta)
    # flat clipping keeps the direction
    clipped, _ = clip_delta({"a": np.array([3.0, 4.0])}, 1.0, "flat")
    assert clipped["a"] == pytest.approx([0.6, 0.8])


class FixedDelta(ClientTrainer):
    """Uploads download + a fixed delta."""

    def __init__(self, market, delta):
        self.market = market
        self.delta = np.asarray(delta, dtype=np.float64)

    def initial_payload(self):
        return {"w": np.zeros_like(self.delta, dtype=np.float32)}

    def fit(self, payload, config):
        return Update({"w": (payload["w"] + self.delta).astype(np.float32)}, num_examples=7)

    def evaluate(self, payload, split, full_ranking=False):
        return {self.market: {"auc": 0.5}}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_client_side_noise_scale_and_clip():
    settings = DPSettings("client", clip_norm=2.0, noise_multiplier=0.5, delta=1e-5)
    delta = np.full(40_000, 1.0)  # norm 200 -> clipped to 2
    client = PrivateClient(FixedDelta("a", delta), settings)
    down = {"w": np.zeros(40_000, dtype=np.float32)}
    up = client.fit(down, RoundConfig(1, 1, 0))
    released = up.payload["w"].astype(np.float64)
    clipped_part = np.full(40_000, 2.0 / 200)
    noise = released - clipped_part
    assert noise.std() == pytest.approx(0.5 * 2.0, rel=0.02)
    assert abs(noise.mean()) < 0.03
    assert up.metrics["dp_update_norm"] == pytest.approx(200.0)
    assert up.metrics["dp_clipped"] == 1.0


def test_server_side_noise_is_on_the_uniform_mean():
    settings = DPSettings("server", clip_norm=1.0, noise_multiplier=2.0, delta=1e-5, accountant="rdp")
    n = 20_000
    trainers = {m: FixedDelta(m, np.full(n, 0.0)) for m in "abcd"}
    trainers, strategy = wrap_private(trainers, FedAvg(), settings, seed=1)
    strategy.initialize({"w": np.zeros(n, dtype=np.float32)})
    downloads = strategy.configure_train(1, list(trainers))
    updates = {m: t.fit(downloads[m], RoundConfig(1, 1, 0)) for m, t in trainers.items()}
    strategy.aggregate_train(1, updates)
    mean = strategy.inner.global_payload["w"].astype(np.float64)
    assert mean.std() == pytest.approx(2.0 * 1.0 / 4, rel=0.02)  # σC / m
    assert strategy.epsilons[0]["epsilon"] == pytest.approx(
        RDPAccountant().epsilon_after(1.0, 2.0, 1e-5), rel=1e-9
    )


def test_server_side_without_noise_is_the_uniform_mean_of_clipped_deltas():
    settings = DPSettings("server", clip_norm=1.0, noise_multiplier=0.0, delta=1e-5)
    trainers = {"a": FixedDelta("a", [3.0, 4.0]), "b": FixedDelta("b", [0.1, 0.0])}
    trainers, strategy = wrap_private(trainers, FedAvg(), settings, seed=0)
    strategy.initialize({"w": np.array([1.0, 1.0], dtype=np.float32)})
    downloads = strategy.configure_train(1, list(trainers))
    strategy.aggregate_train(1, {m: t.fit(downloads[m], RoundConfig(1, 1, 0)) for m, t in trainers.items()})
    # a's delta clipped to (0.6, 0.8); uniform weights, not the example counts
    assert strategy.inner.global_payload["w"] == pytest.approx([1 + (0.6 + 0.1) / 2, 1 + 0.8 / 2], rel=1e-6)


def make_dp_sim(target=None, rounds=6, mode="server", accountant="rdp"):
    settings = DPSettings(
        mode, clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, target_epsilon=target, accountant=accountant
    )
    trainers = {m: FixedDelta(m, [0.01, -0.01]) for m in "abc"}
    trainers, strategy = wrap_private(trainers, FedAvg(), settings, seed=0)
    return Simulator(trainers, strategy, UploadDeclaration(("w",)), rounds=rounds, progress=False)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_in_history_and_stop_at_target(accountant):
    full = make_dp_sim(accountant=accountant).run()
    eps = [h["epsilon"] for h in full.history if h["market"] == "a"]
    assert len(eps) == 6 and all(np.diff(eps) > 0)
    assert full.privacy["epsilon"] == pytest.approx(eps[-1])
    target = (eps[2] + eps[3]) / 2  # between the 3rd and 4th round
    stopped = make_dp_sim(target=target, accountant=accountant).run()
    assert max(h["round"] for h in stopped.history) == 3
    assert stopped.privacy["stopped_before_round"] == 4
    assert stopped.privacy["epsilon"] <= target


def test_client_mode_accounts_local_dp():
    result = make_dp_sim(mode="client", rounds=3).run()
    acc = RDPAccountant()
    acc.step(1.0, 0.5, count=3)  # replace-one sensitivity 2C: σ/2
    assert result.privacy["epsilon"] == pytest.approx(acc.epsilon(1e-5))


def test_privacy_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="privacy.mode"):
        config_from_dict({"privacy": {"mode": "central"}})
    with pytest.raises(ConfigError, match="privacy.clip_norm"):
        config_from_dict({"privacy": {"mode": "server", "clip_norm": 0.0}})
    with pytest.raises(ConfigError, match="privacy.delta"):
        config_from_dict({"privacy": {"delta": 1.5}})
    with pytest.raises(ConfigError, match="bogus"):
        config_from_dict({"privacy": {"bogus": 1}})
    for key in ("noise_multiplier", "clip_norm", "target_epsilon"):
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ConfigError, match=f"privacy.{key}"):
                config_from_dict({"privacy": {"mode": "server", key: bad}})
    with pytest.raises(ConfigError, match="privacy.accountant"):
        config_from_dict({"privacy": {"accountant": "moments"}})
    cfg = config_from_dict({"privacy": {"mode": "client", "target_epsilon": 8, "clipping": "per_key"}})
    assert cfg.privacy.target_epsilon == 8.0


def test_count_keys_are_privatised_as_values_not_deltas():
    """Counts the server sums (FedMM's codebook usage) are measured from zero: measured from last round's
    sum, clipping would freeze them at that sum and the server's sum would grow by the number of markets."""
    settings = DPSettings("server", clip_norm=1e6, noise_multiplier=0.0, delta=1e-5, count_keys=("*usage",))
    usage = {"a": np.array([3.0, 1.0]), "b": np.array([0.0, 5.0])}

    class Counts(FixedDelta):
        def fit(self, payload, config):
            return Update({"w": payload["w"] + 1.0, "usage": usage[self.market]}, num_examples=1)

    trainers = {m: PrivateClient(Counts(m, [0.0, 0.0]), settings) for m in usage}
    download = {"w": np.zeros(2), "usage": np.array([100.0, 100.0])}  # last round's summed usage
    for m, t in trainers.items():
        assert t.fit(download, RoundConfig(1, 1, 0)).payload["usage"] == pytest.approx(usage[m])
    noisy = DPSettings("client", clip_norm=1.0, noise_multiplier=50.0, delta=1e-5, count_keys=("*usage",))
    released = PrivateClient(Counts("a", [0.0, 0.0]), noisy).fit(download, RoundConfig(1, 1, 0)).payload
    assert (released["usage"] >= 0).all()  # clamped after the noise


# (q, σ, rounds, δ) -> ε from dp-accounting 0.6.0's PLD accountant (Poisson-sampled Gaussian), computed once
PLD_EPSILONS = {(1.0, 1.0, 10, 1e-5): 17.856586848893034}


def test_pld_accountant_matches_dp_accounting_and_is_tighter_than_rdp():
    from fedmarket.federation.privacy import PLDAccountant

    acc = PLDAccountant()
    acc.step(1.0, 1.0, count=10)
    assert acc.epsilon(1e-5) == pytest.approx(PLD_EPSILONS[(1.0, 1.0, 10, 1e-5)], rel=1e-6)
    rdp = RDPAccountant()
    rdp.step(1.0, 1.0, count=10)
    assert rdp.epsilon(1e-5) == pytest.approx(19.80, abs=0.01)  # about 10 % looser
    dp = pytest.importorskip("dp_accounting")
    from dp_accounting import pld

    for q, sigma, rounds, delta in [(0.5, 1.0, 3, 1e-5), (0.25, 1.3, 40, 1e-6), (1.0, 0.8, 5, 1e-4)]:
        event = (
            dp.GaussianDpEvent(sigma) if q == 1 else dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(sigma))
        )
        ref = pld.PLDAccountant()
        ref.compose(dp.SelfComposedDpEvent(event, rounds))
        mine = PLDAccountant()
        for _ in range(rounds):  # round by round, as the runtime steps it
            mine.step(q, sigma)
        assert mine.epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-6)
        r = RDPAccountant()
        r.step(q, sigma, count=rounds)
        assert mine.epsilon(delta) <= r.epsilon(delta)
        state = mine.state_dict()
        again = PLDAccountant()
        again.load_state_dict(state)
        assert again.epsilon(delta) == mine.epsilon(delta)


def test_the_accounted_rate_is_the_rate_that_ran_and_amplification_needs_a_secret_draw():
    from fedmarket.federation.privacy import accounted_sampling

    # 8 markets, client_fraction 0.1, min_markets 4: 4 of 8 take part every round
    assert accounted_sampling(8, 0.1, 4, secret=True)[0] == 0.5
    q, note = accounted_sampling(8, 0.1, 4, secret=False)
    assert q == 1.0 and "public seed" in note
    assert accounted_sampling(8, 0.1, 1, secret=True)[0] == 1 / 8
    assert accounted_sampling(8, 1.0, 1, secret=True)[0] == 1.0


def test_a_run_accounts_with_the_participation_that_ran(tmp_path):
    """The example that used to under-report: 8 markets, client_fraction 0.1, min_markets 4, σ 1, 3 rounds."""
    from fedmarket.api import dp_settings

    cfg = config_from_dict(
        {
            "train": {"client_fraction": 0.1, "min_markets": 4},
            "privacy": {
                "mode": "server",
                "noise_multiplier": 1.0,
                "accountant": "rdp",
                "secret_sampling": True,
            },
        }
    )
    settings = dp_settings(cfg, num_markets=8)
    trainers = {m: FixedDelta(m, [0.01, -0.01]) for m in "abcdefgh"}
    trainers, strategy = wrap_private(trainers, FedAvg(), settings, seed=0)

    def sim(path):
        return Simulator(
            trainers,
            strategy,
            UploadDeclaration(("w",)),
            rounds=3,
            client_fraction=0.1,
            min_markets=4,
            secret_sampling=True,
            checkpoint_path=path,
            progress=False,
        )

    first = sim(tmp_path / "a.pt")
    result = first.run()
    assert all(len(d) == 4 for d in first.draws.values())
    expected = RDPAccountant()
    expected.step(0.5, 1.0, count=3)
    assert result.privacy["epsilon"] == pytest.approx(expected.epsilon(1e-5)) == pytest.approx(6.54, abs=0.01)
    assert "4/8" in result.privacy["sampling"]
    # the draw is secret (OS randomness): another run with the same seed draws otherwise; a resumed run
    # replays the recorded draw
    trainers, strategy = wrap_private(
        {m: FixedDelta(m, [0.01, -0.01]) for m in "abcdefgh"}, FedAvg(), settings, 0
    )
    other = sim(tmp_path / "b.pt")
    other.run()
    assert other.draws != first.draws
    resumed = sim(tmp_path / "a.pt")
    assert resumed.load_checkpoint() and resumed.draws == first.draws
