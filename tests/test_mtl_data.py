"""Multi-task data: the real AliExpress / Ali-CCP layouts (schema fixtures), the ML-1M-proxy construction on
hand-made ratings, the synthetic variant and the impression split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedmarket.data import load_dataset
from fedmarket.data.market import MarketData
from fedmarket.data.mtl import (
    ALIEXPRESS_COLUMNS,
    FOLD_TEST,
    FOLD_TRAIN,
    FOLD_VALID,
    MTLMarket,
    impressions_from_ratings,
    split_impressions,
)
from fedmarket.errors import DataError


def test_aliexpress_sample_reads_the_real_layout(data_dir) -> None:
    markets = load_dataset("aliexpress", data_dir=data_dir)
    assert list(markets) == ["us"]
    m = markets["us"]
    assert m.sparse.shape == (120, 16) and m.dense.shape == (120, 63)
    assert list(m.sparse_fields) == [f"id_categorical_{i}" for i in range(1, 17)]
    # SOURCE.md: train 100 rows (60 clicks, 2 conversions), test 20 rows (10 clicks, 2 conversions)
    assert m.click.sum() == 70 and m.conversion.sum() == 4
    assert (m.fold == FOLD_TRAIN).sum() == 100 and (m.fold == FOLD_TEST).sum() == 20
    split = split_impressions(m)
    assert len(split.test_index) == 20 and len(split.valid_index) == 10 and len(split.train_index) == 90


def test_aliexpress_country_folders_and_bad_columns(tmp_path, data_dir) -> None:
    sample = pd.read_csv(data_dir / "mtl-samples/aliexpress/aliexpress_train_sample.csv")
    assert tuple(sample.columns) == ALIEXPRESS_COLUMNS
    for cc in ("NL", "ES"):
        folder = tmp_path / f"AliExpress_{cc}"
        folder.mkdir()
        sample.to_csv(folder / "train.csv", index=False)
        sample.head(10).to_csv(folder / "test.csv", index=False)
    markets = load_dataset("aliexpress", path=str(tmp_path), markets=["es"])
    assert list(markets) == ["es"] and markets["es"].num_interactions == 110
    bad = tmp_path / "bad"
    bad.mkdir()
    sample.drop(columns=["conversion"]).to_csv(bad / "x_train.csv", index=False)
    with pytest.raises(DataError, match="missing column.*conversion"):
        load_dataset("aliexpress", path=str(bad))


def test_aliccp_sample_scenario_field_is_dropped(data_dir) -> None:
    markets = load_dataset("aliccp", data_dir=data_dir)
    assert list(markets) == ["s1"]  # SOURCE.md: only value 1 of field 301 occurs in the samples
    m = markets["s1"]
    assert m.num_interactions == 200
    assert "feat_301" not in m.sparse_fields and len(m.sparse_fields) == 22 and m.dense.shape[1] == 8
    assert m.click.sum() == 12 and m.conversion.sum() == 3
    assert [(m.fold == f).sum() for f in (FOLD_TRAIN, FOLD_VALID, FOLD_TEST)] == [100, 50, 50]


def _rated_market() -> MarketData:
    # 3 users over 12 items; user 0 rates 2, user 1 rates 3 (one 5-star), user 2 rates 11 of 12 items
    users = [0, 0, 1, 1, 1] + [2] * 11
    items = [0, 1, 0, 2, 3] + list(range(11))
    ratings = [5, 3, 4, 5, 1] + [3] * 11
    times = [10, 20, 5, 6, 7] + list(range(100, 111))
    return MarketData(
        name="toy",
        users=np.array(users),
        items=np.array(items),
        timestamps=np.array(times),
        ratings=np.array(ratings, dtype=np.float32),
        user_ids=np.array(["a", "b", "c"], dtype=object),
        item_ids=np.array([f"i{j}" for j in range(12)], dtype=object),
        user_features=pd.DataFrame({"gender": [1, 2, 1], "age": [1, 2, 3]}),
        item_features=pd.DataFrame({"genre": np.arange(12) % 3}),
        meta={"user_feature_sizes": {"gender": 3, "age": 8}, "item_feature_sizes": {"genre": 19}},
    )


def test_proxy_impressions_follow_data_md() -> None:
    rated = _rated_market()
    m = impressions_from_ratings(rated, negatives_per_positive=2, seed=0, drop_user_features=("age",))
    assert list(m.sparse_fields) == ["id_user", "id_item", "feat_gender", "feat_genre"]
    user, item = m.sparse[:, 0], m.sparse[:, 1]
    # 2 unrated per rated, capped by what the user has not rated (user 2: only 1 unrated item left)
    assert np.bincount(user).tolist() == [6, 9, 12]
    rated_pairs = set(zip(rated.users.tolist(), rated.items.tolist(), strict=True))
    clicked = {(u, i) for u, i, c in zip(user, item, m.click, strict=True) if c == 1}
    assert clicked == rated_pairs  # click = rated
    assert all((u, i) not in rated_pairs for u, i, c in zip(user, item, m.click, strict=True) if c == 0)
    assert m.conversion.sum() == 2 and (m.conversion <= m.click).all()  # conversion = rated 5
    np.testing.assert_array_equal(m.ctcvr, m.click * m.conversion)
    # unrated impressions carry the time of one of the same user's ratings; rows are in (user, time) order
    own_times = {u: set(rated.timestamps[rated.users == u].tolist()) for u in range(3)}
    assert all(t in own_times[u] for u, t in zip(m.groups, m.timestamps, strict=True))
    assert (np.diff(m.groups) >= 0).all()
    # deterministic per seed
    again = impressions_from_ratings(rated, negatives_per_positive=2, seed=0, drop_user_features=("age",))
    np.testing.assert_array_equal(again.sparse, m.sparse)


def test_proxy_negatives_follow_popularity() -> None:
    n_items = 40
    pop_items = np.r_[np.zeros(30, dtype=int), np.arange(1, n_items)]  # item 0 is rated 30 times
    users = np.arange(len(pop_items))
    rated = MarketData(
        name="pop",
        users=users,
        items=pop_items,
        timestamps=np.zeros(len(users)),
        ratings=np.full(len(users), 3.0, dtype=np.float32),
        user_ids=np.arange(len(users)),
        item_ids=np.arange(n_items),
    )
    m = impressions_from_ratings(rated, seed=1)
    unrated = m.sparse[m.click == 0, 1]
    # the 39 users who did not rate item 0 are very likely shown it (mass 30 out of 69)
    assert (unrated == 0).sum() >= 25


def test_split_is_per_user_temporal_and_seeded() -> None:
    m = load_dataset("synthetic-mtl", num_markets=2, users_per_market=30, items_per_market=80)["m0"]
    s = split_impressions(m, seed=3)
    parts = (s.train_index, s.valid_index, s.test_index, s.cold_valid_index, s.cold_test_index)
    assert sum(map(len, parts)) == m.num_interactions
    for u in np.unique(m.groups)[:10]:
        rows = np.flatnonzero(m.groups == u)
        test = np.intersect1d(rows, s.test_index)
        train = np.intersect1d(rows, s.train_index)
        assert m.timestamps[test].min() >= m.timestamps[train].max()
    again = split_impressions(m, seed=3)
    np.testing.assert_array_equal(again.test_index, s.test_index)


def test_synthetic_mtl_task_conflict_knob() -> None:
    base = load_dataset("synthetic-mtl", num_markets=2, users_per_market=40, task_conflict=0.0)
    conflict = load_dataset("synthetic-mtl", num_markets=2, users_per_market=40, task_conflict=1.0)
    assert base["m0"].meta["task_conflict"] == 0.0 and conflict["m0"].meta["task_conflict"] == 1.0
    np.testing.assert_array_equal(base["m0"].click, conflict["m0"].click)  # clicks do not depend on it
    assert not np.array_equal(base["m0"].conversion, conflict["m0"].conversion)


def test_mtl_market_rejects_bad_labels() -> None:
    with pytest.raises(DataError, match="0/1"):
        MTLMarket("x", np.zeros((2, 1)), {"id_user": 1}, np.zeros((2, 0)), np.array([0, 2]), np.zeros(2))
    with pytest.raises(DataError, match="outside"):
        MTLMarket("x", np.array([[0], [3]]), {"id_user": 2}, np.zeros((2, 0)), np.zeros(2), np.zeros(2))


@pytest.mark.slow
def test_ml1m_proxy_age_real(data_dir) -> None:
    markets = load_dataset("ml1m-proxy-age", data_dir=data_dir, markets=["age1"])
    m = markets["age1"]
    assert (
        "feat_age" not in m.sparse_fields and "feat_gender" in m.sparse_fields
    )  # scenario attribute dropped
    assert m.summary()["users"] == 222
    assert 0.32 < m.click.mean() < 0.35  # ≈ 1/3 by construction
    assert 78_000 < m.num_interactions < 84_000  # DATA.md: ~82k impressions


def test_proxy_popularity_override_and_its_check() -> None:
    n_items = 40
    rated = MarketData(
        name="pop",
        users=np.arange(n_items - 1),
        items=np.arange(1, n_items),
        timestamps=np.zeros(n_items - 1),
        ratings=np.full(n_items - 1, 3.0, dtype=np.float32),
        user_ids=np.arange(n_items - 1),
        item_ids=np.arange(n_items),
    )
    # item 0 is never rated in this market but very popular elsewhere: globally-drawn negatives show it
    pop = np.r_[1000.0, np.ones(n_items - 1)]
    m = impressions_from_ratings(rated, seed=1, popularity=pop)
    assert (m.sparse[m.click == 0, 1] == 0).sum() >= 30
    with pytest.raises(DataError, match="popularity has 3 entries"):
        impressions_from_ratings(rated, popularity=np.ones(3))


def test_random_impression_split_when_asked() -> None:
    m = load_dataset("synthetic-mtl", num_markets=2, users_per_market=30, items_per_market=80)["m0"]
    m.meta["impression_split"] = "random"
    s = split_impressions(m, seed=3)
    n = m.num_interactions
    parts = (s.train_index, s.valid_index, s.test_index, s.cold_valid_index, s.cold_test_index)
    assert sum(map(len, parts)) == n
    assert abs((len(s.test_index) + len(s.cold_test_index)) / n - 0.1) < 0.03
    # not per-user temporal any more: some user has a test impression older than one of their train ones
    t = m.timestamps.astype(np.float64)
    assert any(
        t[np.intersect1d(np.flatnonzero(m.groups == u), s.test_index)].min(initial=np.inf)
        < t[np.intersect1d(np.flatnonzero(m.groups == u), s.train_index)].max(initial=-np.inf)
        for u in np.unique(m.groups)
    )


@pytest.mark.parametrize("bad", [{"negatives_from": "world"}, {"split": "future"}])
def test_ml1m_proxy_rejects_unknown_construction_options(bad, tmp_path) -> None:
    with pytest.raises(DataError, match=next(iter(bad))):
        load_dataset("ml1m-proxy-age", data_dir=tmp_path, **bad)


@pytest.mark.slow
def test_ml1m_proxy_global_negatives_and_random_split_real(data_dir) -> None:
    glob = load_dataset("ml1m-proxy-age", data_dir=data_dir, markets=["age1"])["age1"]
    own = load_dataset(
        "ml1m-proxy-age", data_dir=data_dir, markets=["age1"], negatives_from="scenario", split="temporal"
    )["age1"]
    assert glob.meta["impression_split"] == "random" and own.meta["impression_split"] == "temporal"
    np.testing.assert_array_equal(glob.click.sum(), own.click.sum())  # the same rated movies
    # the under-18s' negatives follow all of ML-1M, not their own taste: a different set of unrated movies
    neg = lambda m: m.sparse[m.click == 0][:, :2]  # noqa: E731
    assert not np.array_equal(np.sort(neg(glob)[:, 1]), np.sort(neg(own)[:, 1]))
    rng_split = split_impressions(glob)
    assert abs(len(rng_split.test_index) / glob.num_interactions - 0.1) < 0.01


def test_protocol2_moves_cold_item_impressions_to_the_cold_report() -> None:
    """Protocol 2 on impressions: a valid/test impression of an item with no train impression in the
    scenario is not in the main metrics; protocol 1 keeps it (docs/protocol.md)."""
    m = load_dataset("synthetic-mtl", num_markets=2, users_per_market=30, items_per_market=80)["m0"]
    s2 = split_impressions(m, seed=3)
    s1 = split_impressions(m, seed=3, protocol=1)
    items = m.sparse[:, list(m.sparse_fields).index("id_item")]
    warm = set(items[s2.train_index].tolist())
    assert s2.item_field == "id_item" and len(s2.cold_test_index) > 0
    assert all(i in warm for i in items[s2.test_index]) and all(i in warm for i in items[s2.valid_index])
    assert not any(i in warm for i in items[s2.cold_test_index])
    np.testing.assert_array_equal(np.sort(np.r_[s2.test_index, s2.cold_test_index]), s1.test_index)
    assert len(s1.cold_test_index) == 0
    ev = s2.evaluation_summary()
    assert ev["protocol_version"] == 2 and ev["cold_test_impressions"] == len(s2.cold_test_index)
    assert ev["evaluated_impressions"] == len(s2.test_index) and ev["catalog_items"] == len(warm)


def test_planted_cold_items_mtl_no_history_scorer_is_chance_on_main_metric() -> None:
    """A scenario whose held-out clicks are disproportionately items never seen in train: a scorer that knows
    only "no train history" gets exactly chance on the main metric under protocol 2 (every main impression
    is warm, so it scores them all alike) and a clear lift under protocol 1, which the rule removes."""
    from fedmarket.eval.metrics import ctr_metrics
    from fedmarket.methods.floors import MTLFloorClient

    rng = np.random.default_rng(0)
    n_users, n_items, n = 60, 40, 3000
    users = rng.integers(0, n_users, n)
    items = rng.integers(0, 30, n)
    click = (rng.random(n) < 0.3).astype(np.float32)
    fold = np.where(rng.random(n) < 0.8, FOLD_TRAIN, np.where(rng.random(n) < 0.5, FOLD_VALID, FOLD_TEST))
    held = np.flatnonzero(fold != FOLD_TRAIN)
    planted = held[rng.random(len(held)) < 0.2]
    items[planted] = rng.integers(30, n_items, len(planted))  # items 30..39: never in train
    click[planted] = (rng.random(len(planted)) < 0.9).astype(np.float32)  # and mostly clicked
    m = MTLMarket(
        "p",
        np.stack([users, items], 1),
        {"id_user": n_users, "id_item": n_items},
        np.zeros((n, 0)),
        click,
        click * 0,
        groups=users,
        fold=fold,
    )
    no_history = (items >= 30).astype(np.float64)
    s2 = split_impressions(m, seed=1)
    s1 = split_impressions(m, seed=1, protocol=1)
    assert len(s2.cold_test_index) > 0
    assert ctr_metrics(click[s2.test_index], no_history[s2.test_index])["auc"] == 0.5
    assert ctr_metrics(click[s1.test_index], no_history[s1.test_index])["auc"] > 0.6
    # the floors run on impressions and report the cold items apart
    out = MTLFloorClient("p", s2, recency=False, half_life_fraction=0.1).evaluate(None, "test")["p"]
    assert {"ctr_auc", "ctcvr_auc", "mean_auc", "cold_ctr_auc"} <= set(out)
