"""Metrics against scikit-learn, hand-computed cases and brute-force loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from fedmarket.data.split import SeenItems
from fedmarket.eval.metrics import (
    average_over_markets,
    candidate_ranking_metrics,
    ctr_metrics,
    full_ranking_metrics,
    mean_std_over_seeds,
    metrics_from_ranks,
)

# ------------------------------------------------------------------------------------------------- CTR


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_and_logloss_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=500)
    probs = rng.integers(1, 20, size=500) / 20.0  # 19 distinct values: many ties
    probs = np.where(labels == 1, np.minimum(probs + 0.1, 0.95), probs)
    out = ctr_metrics(labels, probs, None)
    assert out["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert out["logloss"] == pytest.approx(log_loss(labels, probs), abs=1e-12)
    assert math.isnan(out["gauc"])


def test_constant_probs_give_auc_one_half_and_torch_inputs_work() -> None:
    labels = torch.tensor([0, 1, 1, 0, 1])
    out = ctr_metrics(labels, torch.full((5,), 0.3), None)
    assert out["auc"] == pytest.approx(0.5)


def test_auc_is_nan_with_one_class() -> None:
    assert math.isnan(ctr_metrics(np.ones(4), np.array([0.1, 0.2, 0.3, 0.4]), None)["auc"])


def test_logloss_clips_hard_zeros_and_ones() -> None:
    out = ctr_metrics(np.array([1, 0]), np.array([0.0, 1.0]), None)
    assert out["logloss"] == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_gauc_hand_computed() -> None:
    # group a: pos 0.9 beats 0.5, loses to 0.95 -> AUC 0.5 over 3 instances
    # group b: pos 0.8 beats both negatives (2), pos 0.3 loses to 0.4, ties 0.3 (0.5) -> 2.5/4 over 4
    # group c: positives only -> skipped
    groups = np.array(["a", "a", "a", "b", "b", "b", "b", "c", "c"])
    labels = np.array([1, 0, 0, 1, 1, 0, 0, 1, 1])
    probs = np.array([0.9, 0.5, 0.95, 0.8, 0.3, 0.4, 0.3, 0.2, 0.7])
    out = ctr_metrics(labels, probs, groups)
    assert out["gauc"] == pytest.approx((3 * 0.5 + 4 * 0.625) / 7)


def test_gauc_matches_per_group_sklearn_loop() -> None:
    rng = np.random.default_rng(7)
    groups = rng.integers(0, 40, size=600)
    labels = rng.integers(0, 2, size=600)
    probs = rng.integers(0, 10, size=600) / 10.0
    num = den = 0.0
    for g in np.unique(groups):
        m = groups == g
        if len(np.unique(labels[m])) == 2:
            num += m.sum() * roc_auc_score(labels[m], probs[m])
            den += m.sum()
    assert ctr_metrics(labels, probs, groups)["gauc"] == pytest.approx(num / den, abs=1e-12)


def test_ctr_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="0/1"):
        ctr_metrics(np.array([0, 2]), np.array([0.1, 0.2]), None)
    with pytest.raises(ValueError, match="non-finite"):
        ctr_metrics(np.array([0, 1]), np.array([0.1, np.nan]), None)
    with pytest.raises(ValueError, match="entries"):
        ctr_metrics(np.array([0, 1]), np.array([0.1]), None)


# --------------------------------------------------------------------------------------- 1+N candidates


def test_candidate_metrics_hand_computed() -> None:
    scores = np.array(
        [
            [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],  # rank 1
            [0.5, 0.9, 0.6, 0.1, 0.2, 0.3],  # rank 3
            [0.5, 0.5, 0.1, 0.1, 0.1, 0.1],  # tie with one negative -> rank 2
            [0.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # rank 6 > k
        ]
    )
    out = candidate_ranking_metrics(scores, ks=(1, 5))
    assert out["hr@1"] == pytest.approx(1 / 4)
    assert out["hr@5"] == pytest.approx(3 / 4)
    assert out["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(3)) / 4)
    assert out["mrr@5"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 4)
    assert out["ndcg@1"] == out["mrr@1"] == pytest.approx(1 / 4)
    assert set(out) == {f"{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in (1, 5)}


def test_constant_model_gets_zero_hit_rate() -> None:
    out = candidate_ranking_metrics(np.zeros((10, 100)))
    assert all(v == 0.0 for v in out.values())


def test_nan_positive_is_ranked_last() -> None:
    scores = np.array([[np.nan, 0.1, 0.2], [0.5, np.nan, 0.1]])
    out = candidate_ranking_metrics(scores, ks=(1,))
    assert out["hr@1"] == pytest.approx(0.5)  # row 0 misses, row 1 hits


def test_metrics_from_ranks_empty_is_nan() -> None:
    assert all(math.isnan(v) for v in metrics_from_ranks(np.array([]), ks=(5,)).values())


# ---------------------------------------------------------------------------------------- full ranking


def _brute_force_ranks(scores: np.ndarray, users: np.ndarray, positives: np.ndarray, seen: SeenItems):
    ranks = []
    for row, (u, p) in enumerate(zip(users, positives, strict=True)):
        excluded = set(seen.indices[seen.indptr[u] : seen.indptr[u + 1]].tolist()) - {int(p)}
        count = sum(
            1
            for j in range(seen.num_items)
            if j != p and j not in excluded and scores[row, j] >= scores[row, p]
        )
        ranks.append(1 + count)
    return np.array(ranks)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_full_ranking_matches_brute_force(as_numpy: bool) -> None:
    rng = np.random.default_rng(3)
    num_users, num_items = 40, 60
    inter_users = rng.integers(0, num_users, size=500)
    inter_items = rng.integers(0, num_items, size=500)
    seen = SeenItems.build(inter_users, inter_items, num_users, num_items)
    users = rng.permutation(num_users)[:30]
    positives = rng.integers(0, num_items, size=30)
    positives[:5] = [seen.indices[seen.indptr[u]] for u in users[:5]]  # positive also in the seen set
    table = rng.integers(0, 8, size=(num_users, num_items)).astype(np.float32)  # coarse: many ties

    def score_fn(chunk: np.ndarray):
        return table[chunk] if as_numpy else torch.from_numpy(table[chunk])

    out = full_ranking_metrics(score_fn, users, positives, seen, ks=(5, 10, 20), chunk_size=7)
    expected = metrics_from_ranks(_brute_force_ranks(table[users], users, positives, seen), prefix="full_")
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key


def test_full_ranking_constant_model_scores_zero() -> None:
    seen = SeenItems.build(np.array([0, 1]), np.array([3, 4]), 2, 50)
    out = full_ranking_metrics(
        lambda chunk: torch.zeros(len(chunk), 50), np.array([0, 1]), np.array([1, 2]), seen
    )
    assert all(v == 0.0 for v in out.values())
    assert "full_ndcg@10" in out


def test_full_ranking_rejects_wrong_score_shape() -> None:
    seen = SeenItems.build(np.array([0]), np.array([1]), 1, 5)
    with pytest.raises(ValueError, match="shape"):
        full_ranking_metrics(lambda chunk: torch.zeros(len(chunk), 4), np.array([0]), np.array([2]), seen)


# ------------------------------------------------------------------------------------------ aggregation


def test_mean_std_over_seeds() -> None:
    mean, std = mean_std_over_seeds([{"auc": 0.7, "x": float("nan")}, {"auc": 0.8, "x": 2.0}, {"auc": 0.9}])
    assert mean["auc"] == pytest.approx(0.8)
    assert std["auc"] == pytest.approx(0.1)  # ddof=1
    assert mean["x"] == 2.0 and std["x"] == 0.0  # NaN ignored; one value -> std 0
    mean1, std1 = mean_std_over_seeds([{"auc": 0.7}])
    assert mean1 == {"auc": 0.7} and std1 == {"auc": 0.0}
    with pytest.raises(ValueError):
        mean_std_over_seeds([])


def test_average_over_markets_is_macro_and_ignores_nan() -> None:
    out = average_over_markets({"de": {"auc": 0.6, "gauc": float("nan")}, "jp": {"auc": 0.8, "gauc": 0.7}})
    assert out == {"auc": pytest.approx(0.7), "gauc": pytest.approx(0.7)}
    assert math.isnan(average_over_markets({"de": {"auc": float("nan")}})["auc"])
