"""Pure personalised aggregators (fedmarket.federation.personalized) on hand-made updates."""

from __future__ import annotations

import numpy as np
import pytest

from fedmarket.federation.personalized import (
    cosine_matrix,
    personalized_aggregate,
    project_conflicts,
    similarity_weights,
)
from fedmarket.methods.pfmsmt import module_of


def test_two_opposite_updates_are_projected() -> None:
    deltas = np.array([[1.0, 0.0], [-1.0, 1.0]])  # cos < 0: they conflict
    out = project_conflicts(deltas)
    # each loses its component along the other: Δ1' ⟂ Δ2, Δ2' ⟂ Δ1
    assert out[0] @ deltas[1] == pytest.approx(0.0)
    assert out[1] @ deltas[0] == pytest.approx(0.0)
    np.testing.assert_allclose(out[0], [0.5, 0.5])
    np.testing.assert_allclose(out[1], [0.0, 1.0])


def test_exactly_opposite_updates_cancel_and_agreeing_ones_are_kept() -> None:
    out = project_conflicts(np.array([[1.0, 2.0], [-1.0, -2.0]]))
    np.testing.assert_allclose(out, 0.0, atol=1e-12)
    agreeing = np.array([[1.0, 0.2], [0.5, 1.0], [0.0, 0.0]])
    np.testing.assert_array_equal(project_conflicts(agreeing, np.random.default_rng(0)), agreeing)


def test_similarity_weights_are_a_row_softmax_of_cosines() -> None:
    deltas = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    w = similarity_weights(deltas, tau=0.5)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    cos = cosine_matrix(deltas)
    expected = np.exp(cos[0] / 0.5) / np.exp(cos[0] / 0.5).sum()
    np.testing.assert_allclose(w[0], expected)
    assert w[0, 1] > w[0, 2]  # the client whose update agrees counts more
    with pytest.raises(ValueError, match="tau"):
        similarity_weights(deltas, tau=0.0)


def _payload(expert: list[float], tower: float) -> dict[str, np.ndarray]:
    return {
        "experts_shared.0.linear0.weight": np.array(expert, dtype=np.float32),
        "towers.ctr.out.bias": np.array([tower], dtype=np.float32),
    }


def test_identical_clients_get_identical_personalised_models() -> None:
    start = _payload([0.0, 0.0], 0.0)
    uploads = [_payload([1.0, 0.5], 1.0), _payload([1.0, 0.5], 1.0), _payload([-1.0, 2.0], -3.0)]
    for coordinate in (False, True):
        out = personalized_aggregate([start] * 3, uploads, module_of, tau=0.5, coordinate=coordinate)
        for key in start:
            np.testing.assert_array_equal(out[0][key], out[1][key])
            assert out[0][key].dtype == np.float32
            if not coordinate:  # (with coordination the 1-D tower updates cancel out to 0 for everyone)
                assert not np.allclose(out[0][key], out[2][key])


def test_modules_are_aggregated_separately_and_switches_work() -> None:
    start = _payload([0.0, 0.0], 0.0)
    uploads = [_payload([1.0, 0.0], 1.0), _payload([0.0, 1.0], 1.0)]
    # towers agree perfectly (cos 1) while experts are orthogonal: per-module similarity
    out = personalized_aggregate([start] * 2, uploads, module_of, tau=0.1, coordinate=False)
    assert out[0]["towers.ctr.out.bias"][0] == pytest.approx(1.0)
    assert out[0]["experts_shared.0.linear0.weight"][0] > 0.9  # mostly its own expert (cos 0 vs 1 at τ=0.1)
    # personalisation off: everyone gets the example-weighted mean
    mean = personalized_aggregate(
        [start] * 2, uploads, module_of, personalize=False, coordinate=False, sizes=[3, 1]
    )
    np.testing.assert_allclose(mean[0]["experts_shared.0.linear0.weight"], [0.75, 0.25])
    np.testing.assert_array_equal(
        mean[0]["experts_shared.0.linear0.weight"], mean[1]["experts_shared.0.linear0.weight"]
    )


def test_conflicting_updates_are_coordinated_before_averaging() -> None:
    start = _payload([0.0, 0.0], 0.0)
    uploads = [_payload([1.0, 0.0], 0.0), _payload([-1.0, 1.0], 0.0)]
    plain = personalized_aggregate([start] * 2, uploads, module_of, personalize=False, coordinate=False)
    coord = personalized_aggregate([start] * 2, uploads, module_of, personalize=False, coordinate=True)
    np.testing.assert_allclose(plain[0]["experts_shared.0.linear0.weight"], [0.0, 0.5])
    np.testing.assert_allclose(coord[0]["experts_shared.0.linear0.weight"], [0.25, 0.75])


def test_module_of() -> None:
    assert module_of("experts_task.ctr.0.linear0.weight") == "experts_task.ctr.0"
    assert module_of("experts_shared.1.bn0.weight") == "experts_shared.1"
    assert module_of("towers.cvr.out.bias") == "towers.cvr"
    assert module_of("embedding.feat_genre.weight") == "embedding.feat_genre"


def test_vectorised_pcgrad_matches_the_textbook_loop() -> None:
    deltas = np.random.default_rng(5).normal(size=(6, 9))

    def naive(d, rng):
        out = d.copy()
        orders = [rng.permutation([j for j in range(len(d)) if j != k]) for k in range(len(d))]
        for k, order in enumerate(orders):
            for j in order:
                dot = out[k] @ d[j]
                if dot < 0:
                    out[k] -= dot / (d[j] @ d[j]) * d[j]
        return out

    expected = naive(deltas, np.random.default_rng(1))
    np.testing.assert_allclose(project_conflicts(deltas, np.random.default_rng(1)), expected, atol=1e-10)
