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


# ---------------------------------------------------------------- the declaration in force is tight
def _families():
    from fedmarket.data import load_dataset
    from fedmarket.data.mtl import split_impressions
    from fedmarket.data.split import leave_one_out
    from fedmarket.data.synthetic import make_synthetic_markets
    from tests import test_fecosr, test_pfmsmt_method

    ctr = make_synthetic_markets(2, [50, 40], 60, (8, 14), seed=1)
    ctr_splits = {n: leave_one_out(m, num_candidates=20, split_seed=1) for n, m in ctr.items()}
    text = make_synthetic_markets(2, [40, 30], 60, (6, 14), with_text=True, seed=5)
    seq_splits = {n: leave_one_out(m, num_candidates=20, split_seed=1) for n, m in text.items()}
    mtl = load_dataset(
        "synthetic-mtl",
        num_markets=2,
        users_per_market=30,
        items_per_market=50,
        interactions_per_user=(8, 15),
    )
    mtl_splits = {n: split_impressions(m) for n, m in mtl.items()}

    def ctr_cfg(method, model="deepfm", features="none", **options):
        return config_from_dict(
            {
                "name": "t",
                "method": {"name": method, "options": options},
                "model": {"name": model, "embed_dim": 8, "hidden": [16], "item_features": features},
                "train": {"rounds": 4},
                "eval": {"candidates": 20},
                "progress": False,
            }
        )

    fedmm = {"rqvae_rounds": 1, "rqvae_epochs": 1, "embedding_epochs": 1}
    return {
        "fedavg-deepfm": (ctr_cfg("fedavg"), ctr_splits, "auc", 1),
        "fedavg-dcnv2": (ctr_cfg("fedavg", "dcnv2"), ctr_splits, "auc", 1),
        "fedprox-buckets": (ctr_cfg("fedprox", features="buckets"), ctr_splits, "auc", 1),
        "fedper-dcnv2": (ctr_cfg("fedper", "dcnv2"), ctr_splits, "auc", 1),
        "fedmm-deepfm": (ctr_cfg("fedmm", **fedmm), ctr_splits, "auc", 3),
        "fedmm-dcnv2-c1": (
            ctr_cfg("fedmm", "dcnv2", ctr_federation="c1_dense", **fedmm),
            ctr_splits,
            "auc",
            3,
        ),
        "fecosr": (test_fecosr.cfg_for("fecosr", 2, federated_rounds=1), seq_splits, "ndcg@10", 1),
        "mtl_fedavg": (test_pfmsmt_method._cfg("mtl_fedavg"), mtl_splits, "mean_auc", 1),
        "pfmsmt": (test_pfmsmt_method._cfg("pfmsmt"), mtl_splits, "mean_auc", 1),
    }


FAMILIES = (
    "fedavg-deepfm",
    "fedavg-dcnv2",
    "fedprox-buckets",
    "fedper-dcnv2",
    "fedmm-deepfm",
    "fedmm-dcnv2-c1",
    "fecosr",
    "mtl_fedavg",
    "pfmsmt",
)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_declaration_in_force_is_what_leaves(family) -> None:
    """Every uploaded key is in the declaration the runtime enforces, and every pattern of it is used (unless
    the data gave the model no such parameter, e.g. shared feature tables of a dataset without shared
    features): the declaration in force, computed from the run's options, is exactly what left the markets."""
    from fnmatch import fnmatchcase

    import torch

    from fedmarket.federation.runtime import Simulator

    torch.set_num_threads(1)
    cfg_, splits, metric, rounds = _families()[family]
    m = get_method(cfg_.method.name)
    opts = m.parse_options(cfg_.method.options)
    trainers, strategy = m.build(cfg_, opts, splits, 0)
    declaration = m.declaration_for(cfg_, opts)
    sim = Simulator(
        trainers, strategy, declaration, rounds=cfg_.train.rounds, select_metric=metric, progress=False
    )
    assert sim.declaration is declaration
    result = sim.run()
    assert not result.failures, result.failures
    keys = {k for u in result.uploads for k in u["keys"]}
    assert all(declaration.allows(k) for k in keys)
    present = set()  # the parameters the markets' models have (when a trainer exposes one model)
    for trainer in trainers.values():
        model = getattr(trainer, "model", None)
        present |= set(model.state_dict()) if model is not None else set()
    unused = [
        p
        for p in declaration.patterns
        if not any(fnmatchcase(k, p) for k in keys)
        and (not present or any(fnmatchcase(k, p) for k in present))
    ]
    assert not unused, f"{family}: declared but never sent: {unused}"
