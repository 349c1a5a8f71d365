"""FedMM under secure aggregation (in process): the RQ-VAE rounds after the first merge are sums of what the
markets upload (u·G, u, n·θ with weight 1), so the simulated secure sum gives the plain merge up to its
fixed-point quantisation; the first merge (k-means over centroids) stays a named clear round."""

import json

import numpy as np
import pytest
from test_fedmm import FAST, check_uploads, fedmm_cfg, synthetic

from fedmarket.api import run_experiment
from fedmarket.checkpoint import load_state
from fedmarket.config import config_from_dict
from fedmarket.federation.secagg import server_step_kind
from fedmarket.methods.fedmm import (
    FEDMM_UPLOAD,
    GLOBAL_CODEBOOK,
    GLOBAL_CODEBOOK_X_USAGE,
    GLOBAL_USAGE,
    merge_codebook_sums,
    merge_codebooks,
    upload_declaration,
)


def test_merge_from_sums_equals_the_code_by_code_merge():
    rng = np.random.default_rng(0)
    k, d = 12, 5
    books = {m: rng.standard_normal((k, d)).astype(np.float32) for m in "abc"}
    usage = {m: rng.integers(0, 4, k).astype(np.float32) for m in "abc"}
    for m in usage:
        usage[m][:2] = 0  # codes 0-1 dead everywhere: re-seeded from the same donors in both
    previous = rng.standard_normal((k, d)).astype(np.float32)
    plain = merge_codebooks({m: (books[m], usage[m]) for m in books}, previous, seed=3)
    weighted = sum(usage[m][:, None].astype(np.float64) * books[m] for m in books)
    total = sum(usage[m].astype(np.float64) for m in books)
    from_sums = merge_codebook_sums(weighted, total + 1e-7, previous, seed=3)  # + quantisation-like noise
    np.testing.assert_allclose(from_sums[0], plain[0], atol=1e-5)
    np.testing.assert_array_equal(from_sums[1], plain[1])  # integer counts: the rounding is exact


@pytest.mark.parametrize("options", [{}, {"codebook": "global_only", "ctr_federation": "codes_dense"}])
def test_weighted_uploads_are_declared_and_merge_without_a_wrapper(options, monkeypatch):
    import test_fedmm

    from fedmarket.methods import get_method

    opts = get_method("fedmm").parse_options({**FAST, **options})
    for pattern in upload_declaration(opts, secure_sums=True).patterns:
        assert pattern in FEDMM_UPLOAD.patterns
    assert GLOBAL_CODEBOOK_X_USAGE in upload_declaration(opts, secure_sums=True).patterns
    # every round's uploads (round 3 the weighted sums) pass the declaration, and the strategy merges the
    # markets' own sums (weight 1 each) when no secure-aggregation wrapper sits in between
    monkeypatch.setattr(test_fedmm, "upload_declaration", lambda o: upload_declaration(o, secure_sums=True))
    check_uploads(fedmm_cfg(synthetic(), options, rounds=4, secure_aggregation={"enabled": True}))


def _run(tmp_path, name, secure):
    cfg = {
        "name": name,
        "dataset": synthetic(num_markets=3, users_per_market=[60, 40, 50]),
        "method": {"name": "fedmm", "options": {**FAST, "global_codes": 8}},
        "train": {"rounds": 4, "batch_size": 4096, "threads": 1},
        "eval": {"full_ranking": False, "candidates": 20},
        "progress": False,
        "output_dir": str(tmp_path / name),
        "secure_aggregation": {"enabled": secure},
    }
    run_dir = run_experiment(config_from_dict(cfg))
    state = load_state(run_dir / "checkpoints" / "seed0.ckpt")["strategy"]
    state = state.get("inner", state)  # SecureAggregation wraps the FedMM strategy
    return json.loads((run_dir / "metrics.json").read_text()), state["state"]["rqvae"]


def test_secure_fedmm_gives_the_plain_codebook_and_metrics_within_quantization(tmp_path):
    plain_metrics, plain = _run(tmp_path, "plain", False)
    metrics, secure = _run(tmp_path, "secure", True)
    record = metrics["privacy"]["secure_aggregation"]
    # round 1 uploads nothing; 2 = first merge (k-means, clear); 3 = RQ-VAE merge from sums; 4 = CTR
    assert record["secured_rounds"] == [3, 4] and record["clear_rounds"] == [2]
    assert "k-means" in record["clear_reasons"][0]
    assert metrics["failures"] == []
    # round 3 starts from the same state in both runs (round 2 is the same clear merge), so the merged
    # codebook, usage and encoder/decoder differ by the fixed-point rounding only: 3 markets x 2^-25 on each
    # mean of (u·G, u, n·θ), plus float32 storage of u·G and of the result; the usage sums are exact
    assert sorted(plain) == sorted(secure)
    np.testing.assert_array_equal(plain[GLOBAL_USAGE], secure[GLOBAL_USAGE])
    errors = {
        k: np.abs(np.asarray(plain[k], np.float64) - np.asarray(secure[k], np.float64)).max() for k in plain
    }
    assert max(errors.values()) <= 1e-6, errors  # measured: <= 3e-8
    assert errors[GLOBAL_CODEBOOK] > 0  # it did go through the quantised sum
    for market, values in metrics["per_market"].items():
        for k, v in values.items():
            assert v == pytest.approx(plain_metrics["per_market"][market][k], abs=1e-3), (market, k)


def test_rqvae_rounds_stay_clear_under_dp():
    from fedmarket.api import protect_strategy
    from fedmarket.methods import get_method

    for privacy, secured in (({"mode": "off"}, True), ({"mode": "client", "clip_norm": 1.0}, False)):
        cfg = fedmm_cfg(synthetic(), rounds=4, secure_aggregation={"enabled": True}, privacy=privacy)
        method = get_method("fedmm")
        opts = method.parse_options(cfg.method.options)
        from fedmarket.data.prepare import prepare_data

        _, strategy = method.build(cfg, opts, prepare_data(cfg).splits, 0)
        strategy = protect_strategy(cfg, strategy, 0)
        assert server_step_kind(strategy, 2)[0] is False  # the first merge: never a sum
        assert server_step_kind(strategy, 3)[0] is secured


def test_the_weighted_sum_keys_are_in_the_upload_contract_not_in_the_download():
    """A round of weighted sums downloads only the codebook and autoencoder; the keys the markets send back
    (u·G, n·θ) are part of the round's upload contract, so no placeholder arrays travel (or are counted)."""
    from fedmarket.methods import get_method
    from fedmarket.methods.fedmm import FedMMStrategy, Schedule

    opts = get_method("fedmm").parse_options(dict(FAST))
    schedule = Schedule.from_options(opts, 6)
    strategy = FedMMStrategy(opts, schedule, secure_sums=True)
    book = np.ones((opts.global_codes, opts.latent_dim), np.float32)
    strategy.state["rqvae"] = {GLOBAL_CODEBOOK: book, GLOBAL_USAGE: np.ones(opts.global_codes, np.float32)}
    sums_round = next(r for r in range(1, 7) if schedule.uploads_sums(opts, True, r))
    down = strategy.configure_train(sums_round, ["a"])["a"]
    assert GLOBAL_CODEBOOK_X_USAGE not in down
    contract = strategy.upload_contract(sums_round, down)
    assert contract[GLOBAL_CODEBOOK_X_USAGE] == book.shape == contract[GLOBAL_CODEBOOK]
    plain = FedMMStrategy(opts, schedule, secure_sums=False)
    assert GLOBAL_CODEBOOK_X_USAGE not in plain.upload_contract(sums_round, down)
