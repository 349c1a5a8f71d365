"""``model.item_features``: the item statistics FedMM derives, given to every CTR baseline as bucketised
(categorical) or dense (numeric) fields, federated like the dense layers and declared only when used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmarket.config import config_from_dict
from fedmarket.data.split import leave_one_out
from fedmarket.data.synthetic import make_synthetic_markets
from fedmarket.federation.runtime import Simulator
from fedmarket.methods import get_method
from fedmarket.methods.item_stats import ITEM_STAT_NAMES, item_stat_dense
from fedmarket.models.ctr import FIXED_POINT, build_ctr_model, to_fixed_point


def _cfg(method: str, features: str, model: str = "deepfm"):
    return config_from_dict(
        {
            "name": "t",
            "method": {"name": method},
            "model": {"name": model, "item_features": features},
            "eval": {"candidates": 20},
            "progress": False,
        }
    )


@pytest.fixture(scope="module")
def splits():
    markets = make_synthetic_markets(2, [60, 50], 80, (8, 14), seed=1)
    return {n: leave_one_out(mk, num_candidates=20, split_seed=1) for n, mk in markets.items()}


def test_declarations_follow_the_mode() -> None:
    for name in ("fedavg", "fedprox", "fedper"):
        m = get_method(name)
        bucket, dense = (
            "features.embedding.stat_popularity.weight",
            "features.embedding.num_stat_popularity.weight",
        )
        on_b, on_d = m.declaration_for(_cfg(name, "buckets")), m.declaration_for(_cfg(name, "dense"))
        assert on_b.allows(bucket) and not on_b.allows(dense)
        assert on_d.allows(dense) and not on_d.allows(bucket)


@pytest.mark.parametrize("model", ["deepfm", "dcnv2"])
def test_numeric_fields_embed_value_times_vector_and_score_matrix_agrees(model) -> None:
    torch.manual_seed(0)
    fields = {"user": 5, "item": 7, "num_stat_a": 1, "num_stat_b": 1}
    net = build_ctr_model(model, fields, 1, embed_dim=4, hidden=[8], dropout=0.0).eval()
    values = np.array([[0.5, -1.25], [2.0, 0.0], [-3.0, 1.5], [0.1, 0.2], [1, 1], [0, 0], [4, -4]])
    item_x = torch.cat([torch.arange(7)[:, None], torch.from_numpy(to_fixed_point(values))], dim=1)
    user_x = torch.arange(5)[:, None]
    emb, lin = net.features(item_x, ["item", "num_stat_a", "num_stat_b"])
    v = net.features.embedding["num_stat_a"].weight[0]
    torch.testing.assert_close(emb[2, 1], -3.0 * v)
    assert to_fixed_point([1.0])[0] == FIXED_POINT
    pairs = torch.cat([user_x.repeat_interleave(7, 0), item_x.repeat(5, 1)], dim=1)
    torch.testing.assert_close(net.score_matrix(user_x, item_x).reshape(-1), net(pairs), atol=1e-5, rtol=1e-5)


def test_dense_statistics_are_finite_z_scores(splits) -> None:
    split = next(iter(splits.values()))
    fields = item_stat_dense(split)
    assert list(fields) == [f"num_stat_{n}" for n in ITEM_STAT_NAMES]
    for codes, vocab in fields.values():
        assert vocab == 1 and codes.shape == (split.market.num_items,)
        assert np.abs(codes / FIXED_POINT).max() < 50


@pytest.mark.parametrize("features", ["buckets", "dense"])
def test_fedavg_with_item_features_uploads_the_statistic_tables(splits, features) -> None:
    cfg = _cfg("fedavg", features)
    m = get_method("fedavg")
    trainers, strategy = m.build(cfg, m.parse_options({}), splits, 0)
    sim = Simulator(trainers, strategy, m.declaration_for(cfg), rounds=2, seed=0, progress=False)
    result = sim.run()
    assert not result.failures
    prefix = "num_stat_" if features == "dense" else "stat_"
    for row in result.uploads:
        stat = {k for k in row["keys"] if k.startswith("features.embedding.") and "stat_" in k}
        assert stat == {f"features.embedding.{prefix}{n}.weight" for n in ITEM_STAT_NAMES}
        assert not any(k.startswith("features.embedding.item") for k in row["keys"])  # IDs stay local
    for metrics in result.test.values():
        assert np.isfinite(metrics["auc"])
