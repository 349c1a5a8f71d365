"""The declaration in force is computed from the run's options and is what the runtime enforces."""

from __future__ import annotations

import numpy as np
import pytest

from fedmarket.config import config_from_dict
from fedmarket.errors import PayloadError
from fedmarket.methods import get_method


def cfg(method: str, **sections):
    return config_from_dict({"name": "t", "method": {"name": method}, **sections})


def test_dense_methods_declare_the_statistic_tables_only_when_they_use_them() -> None:
    for name in ("fedavg", "fedprox", "fedper"):
        m = get_method(name)
        off = m.declaration_for(cfg(name))
        on = m.declaration_for(cfg(name, model={"item_features": "buckets"}))
        key = "features.embedding.stat_popularity.weight"
        assert not off.allows(key) and on.allows(key)
        assert m.declaration.allows(key)  # the union over options holds it
        with pytest.raises(PayloadError, match="undeclared"):
            off.check({key: np.zeros(3)}, "ca")


def test_fedmm_enforces_its_narrowed_declaration() -> None:
    m = get_method("fedmm")
    options = {"codebook": "local", "ctr_federation": "none", "federate_autoencoder": False}
    narrowed = m.declaration_for(
        config_from_dict({"name": "t", "method": {"name": "fedmm", "options": options}})
    )
    assert narrowed.patterns == ()  # nothing leaves: local codebooks, no autoencoder or CTR federation
    assert m.declaration.allows("rqvae.global_codebook")  # the union over options allows it
    with pytest.raises(PayloadError):
        narrowed.check({"rqvae.global_codebook": np.zeros((2, 2))}, "jp")


def test_the_runtime_rejects_a_key_outside_the_declaration_in_force(tmp_path) -> None:
    """FedAvg without item features: a market that uploads a statistic table fails alone."""
    from fedmarket.data.split import leave_one_out
    from fedmarket.data.synthetic import make_synthetic_markets
    from fedmarket.federation.core import Update
    from fedmarket.federation.runtime import Simulator

    markets = make_synthetic_markets(2, [60, 50], 80, (8, 14), seed=1)
    splits = {n: leave_one_out(mk, num_candidates=20, split_seed=1) for n, mk in markets.items()}
    c = config_from_dict(
        {"name": "t", "method": {"name": "fedavg"}, "eval": {"candidates": 20}, "progress": False}
    )
    m = get_method("fedavg")
    trainers, strategy = m.build(c, m.parse_options({}), splits, 0)
    bad = next(iter(trainers))
    fit = trainers[bad].fit

    def leaky(payload, config):
        up = fit(payload, config)
        return Update(
            {**up.payload, "features.embedding.stat_popularity.weight": np.zeros((11, 16), np.float32)},
            up.num_examples,
        )

    trainers[bad].fit = leaky
    sim = Simulator(trainers, strategy, m.declaration_for(c), rounds=1, seed=0, progress=False)
    result = sim.run()
    assert [f["market"] for f in result.failures] == [bad]
    assert "undeclared" in result.failures[0]["error"]


@pytest.mark.parametrize(
    "bad",
    [{"train_user_u0_last_item": 17.0}, {"loss": float("inf")}, {"loss": [1.0, 2.0]}, {"loss": "0.3"}],
)
def test_a_market_reporting_an_undeclared_or_non_scalar_metric_fails_alone(bad) -> None:
    from fedmarket.data.split import leave_one_out
    from fedmarket.data.synthetic import make_synthetic_markets
    from fedmarket.federation.core import Update
    from fedmarket.federation.runtime import Simulator

    markets = make_synthetic_markets(3, [60, 50, 40], 80, (8, 14), seed=1)
    splits = {n: leave_one_out(mk, num_candidates=20, split_seed=1) for n, mk in markets.items()}
    c = config_from_dict(
        {"name": "t", "method": {"name": "fedavg"}, "eval": {"candidates": 20}, "progress": False}
    )
    m = get_method("fedavg")

    def run(poison: bool):
        trainers, strategy = m.build(c, m.parse_options({}), splits, 0)
        if poison:
            liar = trainers["m1"]
            fit = liar.fit
            liar.fit = lambda p, cfg: (lambda u: Update(u.payload, u.num_examples, {**u.metrics, **bad}))(
                fit(p, cfg)
            )
        return Simulator(trainers, strategy, m.declaration_for(c), rounds=2, seed=0, progress=False).run()

    result = run(True)
    assert {f["market"] for f in result.failures} == {"m1"}
    assert all(not any(k in row for k in ("train_train_user_u0_last_item",)) for row in result.history)
    clean = run(False)
    # the other markets' uploads were unaffected in round 1 (m1 was left out of the aggregate from round 1)
    assert set(result.test) == {"m0", "m1", "m2"} and set(clean.test) == set(result.test)


def test_the_declared_metrics_are_written_to_metrics_json_for_the_report() -> None:
    decl = get_method("fedmm").declaration_for(cfg("fedmm"))
    assert "recon" in decl.metric_patterns and "auc" in decl.metric_patterns
    assert not decl.allows_metric("train_user_u0_last_item")


def test_pfmsmt_declares_what_its_options_send() -> None:
    """PF-MSMTrec's declaration in force follows its options (FedBN keeps BatchNorm local; towers: false
    keeps the towers local) and is what the runtime checks."""
    m = get_method("pfmsmt")
    on = m.declaration_for(cfg("pfmsmt"))
    off = m.declaration_for(
        config_from_dict({"name": "t", "method": {"name": "pfmsmt", "options": {"towers": False}}})
    )
    assert on.allows("towers.ctr.out.weight") and not off.allows("towers.ctr.out.weight")
    assert m.declaration.allows("towers.ctr.out.weight")
