"""Secure aggregation: masks cancel, the server sees only random-looking uploads, the aggregate equals the
plain one within the fixed-point error; non-sum server steps are named."""

import numpy as np
import pytest

from fedmarket.federation.aggregators import weighted_mean
from fedmarket.federation.core import Update
from fedmarket.federation.privacy import DPSettings, PrivateStrategy
from fedmarket.federation.secagg import (
    SecureAggregation,
    dequantize,
    mask_uploads,
    quantize,
    secure_sum,
    server_step_kind,
    unmask_sum,
)
from fedmarket.federation.strategies import FedAvg, NoFederation


def test_quantize_roundtrip_and_negatives():
    x = np.array([-3.25, 0.0, 1e-9, 12345.678])
    assert dequantize(quantize(x, 20), 20) == pytest.approx(x, abs=2**-21)


def test_masked_uploads_cancel_and_hide_each_vector():
    rng = np.random.default_rng(0)
    vectors = {m: rng.normal(0, 5, 1000) for m in "abcde"}
    masked = mask_uploads(vectors, seed=1, server_round=3, fraction_bits=24)
    for m, v in vectors.items():
        # one masked upload decodes to noise, not the market's vector
        assert np.corrcoef(dequantize(masked[m], 24), v)[0, 1] < 0.1
    total = unmask_sum(masked, 24)
    assert total == pytest.approx(sum(vectors.values()), abs=len(vectors) * 2**-24)
    # a missing upload leaves the masks uncancelled (until the survivors reveal their seeds, below)
    partial = unmask_sum({m: y for m, y in masked.items() if m != "a"}, 24)
    assert not np.allclose(partial, sum(v for m, v in vectors.items() if m != "a"), atol=1)


def test_secure_fedavg_equals_plain_fedavg_within_quantization_error():
    rng = np.random.default_rng(1)
    updates = {
        m: Update({"w": rng.normal(0, 1, (20, 3)).astype(np.float32), "b": rng.normal(0, 1, 3)}, n)
        for m, n in zip("abcd", (10, 200, 3000, 7), strict=True)
    }
    plain = weighted_mean([u.payload for u in updates.values()], [u.num_examples for u in updates.values()])
    bits = 16
    strategy = SecureAggregation(FedAvg(), seed=5, fraction_bits=bits)
    strategy.initialize({"w": np.zeros((20, 3), np.float32), "b": np.zeros(3)})
    strategy.aggregate_train(1, updates)
    # error bound: n markets' rounding of n_k θ_k, divided by Σ n_k (plus float32 storage of w)
    bound = len(updates) * 2.0 ** -(bits + 1) / sum(u.num_examples for u in updates.values())
    assert np.abs(strategy.inner.global_payload["b"] - plain["b"]).max() <= bound
    assert np.abs(strategy.inner.global_payload["w"] - plain["w"]).max() <= bound + 1e-6
    for m, y in strategy.last_masked.items():
        assert y.dtype == np.uint64 and not np.array_equal(y, quantize(updates[m].payload["b"], bits))
    assert strategy.privacy_report()["secure_aggregation"]["secured_rounds"] == [1]


def test_non_sum_server_steps_are_aggregated_in_the_clear_and_named():
    assert server_step_kind(FedAvg(), 1)[0]
    is_sum, why = server_step_kind(FedAvg(aggregation="median"), 1)
    assert not is_sum and "median" in why
    assert not server_step_kind(NoFederation(), 1)[0]
    strategy = SecureAggregation(FedAvg(aggregation="median"), seed=0)
    strategy.initialize({"w": np.zeros(2)})
    strategy.aggregate_train(
        1, {m: Update({"w": np.array([v, v])}, 1) for m, v in zip("abc", (1.0, 2.0, 9.0), strict=True)}
    )
    assert strategy.inner.global_payload["w"] == pytest.approx([2.0, 2.0])
    report = strategy.privacy_report()["secure_aggregation"]
    assert report["clear_rounds"] == [1] and "median" in report["clear_reasons"][0]


def test_pfmsmt_server_step_is_not_a_sum():
    from fedmarket.methods.pfmsmt import PersonalizedStrategy

    strategy = PersonalizedStrategy.__new__(PersonalizedStrategy)  # kind depends on the class only
    is_sum, why = server_step_kind(strategy, 1)
    assert not is_sum and "personalised" in why


def test_server_dp_with_secure_sum_matches_plain_sum():
    settings = DPSettings("server", clip_norm=100.0, noise_multiplier=0.0, delta=1e-5)
    deltas = {"a": np.array([1.0, -2.0]), "b": np.array([0.5, 0.25]), "c": np.array([-1.0, 0.0])}
    results = []
    for summer in (None, lambda r, v: secure_sum(v, 0, r, 24)):
        strategy = PrivateStrategy(FedAvg(), settings, seed=0, secure_sum=summer)
        strategy.initialize({"w": np.zeros(2)})
        downloads = strategy.configure_train(1, list(deltas))
        strategy.aggregate_train(1, {m: Update({"w": downloads[m]["w"] + d}, 1) for m, d in deltas.items()})
        results.append(strategy.inner.global_payload["w"])
    assert results[1] == pytest.approx(results[0], abs=1e-6)
    assert results[0] == pytest.approx(sum(deltas.values()) / 3)


def test_dropout_after_masking_is_recovered_from_the_survivors_revealed_seeds():
    from fedmarket.federation.secagg import (
        reveal_pair_seeds,
        secure_sum_with_dropouts,
        unmask_sum_with_dropouts,
    )

    rng = np.random.default_rng(2)
    vectors = {m: rng.normal(0, 3, 500) for m in "abcdef"}
    bits = 24
    for dropped in (["c"], ["a", "f"], ["b", "d", "e"]):
        survivors = [m for m in vectors if m not in dropped]
        plain = sum(vectors[m] for m in survivors)
        got = secure_sum_with_dropouts(vectors, dropped, seed=7, server_round=2, fraction_bits=bits)
        assert got == pytest.approx(plain, abs=len(survivors) * 2.0 ** -(bits + 1) + 1e-12)
        # without the revealed seeds the dropped markets' pair masks stay in the sum
        masked = mask_uploads(vectors, seed=7, server_round=2, fraction_bits=bits)
        kept = {m: masked[m] for m in survivors}
        assert not np.allclose(unmask_sum(kept, bits), plain, atol=1)
        # the server never gets a seed that would unmask a survivor
        revealed = {m: reveal_pair_seeds(m, dropped, 7, 2) for m in survivors}
        assert all(set(r) == set(dropped) for r in revealed.values())
        with pytest.raises(ValueError, match="unmask"):
            unmask_sum_with_dropouts(kept, {survivors[0]: {survivors[1]: revealed[survivors[0]][dropped[0]]}})
