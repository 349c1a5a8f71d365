"""FedMM: what leaves a market, the phase schedule, codebook merging, bad input, alignment diagnostic."""

import numpy as np
import pytest
import torch

from fedmarket.api import run_seed
from fedmarket.checkpoint import load_state
from fedmarket.config import config_from_dict
from fedmarket.data.prepare import prepare_data
from fedmarket.errors import ConfigError, PayloadError
from fedmarket.federation.core import RoundConfig, Update
from fedmarket.federation.runtime import Simulator
from fedmarket.methods import get_method
from fedmarket.methods.fedmm import (
    FEDMM_UPLOAD,
    GLOBAL_CODEBOOK,
    GLOBAL_USAGE,
    code_alignment,
    item_statistics,
    merge_codebooks,
    upload_declaration,
    user_history_codes,
)

FAST = {"embedding_epochs": 2, "rqvae_rounds": 2, "rqvae_epochs": 2, "global_codes": 16, "local_codes": 8}


def fedmm_cfg(dataset: dict, options: dict | None = None, rounds: int = 4, **extra):
    return config_from_dict(
        {
            "name": "t_fedmm",
            "dataset": dataset,
            "method": {"name": "fedmm", "options": {**FAST, **(options or {})}},
            "train": {"rounds": rounds, "batch_size": 4096, "threads": 1},
            "eval": {"full_ranking": False, "candidates": 20},
            "progress": False,
            **extra,
        }
    )


def synthetic(**options):
    base = {"num_markets": 2, "users_per_market": 60, "items_per_market": 60, "interactions_per_user": [5, 8]}
    return {"name": "synthetic", "options": {**base, **options}}


def build(cfg):
    method = get_method("fedmm")
    opts = method.parse_options(cfg.method.options)
    data = prepare_data(cfg)
    trainers, strategy = method.build(cfg, opts, data.splits, 0)
    strategy.initialize(next(iter(trainers.values())).initial_payload())
    return method, opts, data, trainers, strategy


VARIANTS = [
    {},
    {"embedding": "fedctr", "embedding_rounds": 1, "item_stats": "concat", "federate_autoencoder": True},
    {"codebook": "global_only", "ctr_federation": "codes_dense"},
    {"codebook": "local", "ctr_federation": "none", "federate_autoencoder": False},
    {"item_stats": "none", "federate_autoencoder": False},  # FedMM as first specified (MF-BPR embeddings)
    {"user_codes": "history"},  # u1 table federated with c1, u2 local
    {"codebook": "global_only", "ctr_federation": "codes_dense", "user_codes": "history"},  # u1 and u2
    {"ctr_federation": "dense", "user_codes": "history"},  # code tables (c and u) all local
]


def brute_force_mode(codes_of_user: list[int], reserved: int) -> int:
    if not codes_of_user:
        return reserved
    counts = {c: codes_of_user.count(c) for c in codes_of_user}
    return min(c for c in counts if counts[c] == max(counts.values()))


def check_uploads(cfg):
    method, opts, data, trainers, strategy = build(cfg)
    narrow = upload_declaration(opts)
    rounds = next(iter(trainers.values())).schedule.embed_rounds + opts.rqvae_rounds + 1
    for server_round in range(1, rounds + 1):
        downloads = strategy.configure_train(server_round, list(trainers))
        updates = {}
        for name, trainer in trainers.items():
            update = trainer.fit(downloads[name], RoundConfig(server_round, 1, 0))
            method.declaration.check(update.payload, name)  # the method's one declaration
            narrow.check(update.payload, name)  # and only what this configuration sends
            ids = {data.markets[name].num_users, data.markets[name].num_items}
            for key, value in update.payload.items():
                assert "embedding.item" not in key and "embedding.user" not in key, key
                assert not (set(np.shape(value)) & ids), f"{key} {np.shape(value)} has an ID-sized dimension"
            updates[name] = update
        strategy.aggregate_train(server_round, updates)
    phase_keys = {k for u in updates.values() for k in u.payload}
    if opts.codebook == "local":
        assert not any(k.startswith("rqvae.") for k in narrow.patterns)
    else:
        assert GLOBAL_CODEBOOK in narrow.patterns and GLOBAL_USAGE in narrow.patterns
    if opts.ctr_federation == "c1_dense":
        assert "ctr.features.embedding.c1.weight" in phase_keys
        assert "ctr.features.embedding.c2.weight" not in phase_keys
    user = opts.user_codes == "history"
    assert ("ctr.features.embedding.u1.weight" in phase_keys) == (
        user and opts.ctr_federation in ("c1_dense", "codes_dense")
    )
    assert ("ctr.features.embedding.u2.weight" in phase_keys) == (
        user and opts.ctr_federation == "codes_dense"
    )
    for trainer in trainers.values():  # the CTR model has the user code fields iff the option is on
        fields = trainer.ctr.model.fields
        assert ("u1" in fields and "u2" in fields) == user
        if user:
            assert fields["u1"] == opts.global_codes + 1 and fields["u2"] == opts.local_codes + 1
            assert list(fields).index("u2") < trainer.ctr.model.num_user_fields  # user-side fields


@pytest.mark.parametrize("options", [{}, {"user_codes": "history"}])
def test_real_uploads_hold_only_declared_keys_and_nothing_id_indexed(data_dir, options):
    dataset = {"name": "xmrec", "markets": ["in", "jp"], "data_dir": str(data_dir)}
    check_uploads(fedmm_cfg(dataset, options, rounds=4))


@pytest.mark.parametrize("options", VARIANTS)
def test_uploads_of_each_variant_hold_only_declared_keys(options):
    # synthetic items_per_market=60 / users 60: no tensor may have a dimension of 60
    check_uploads(fedmm_cfg(synthetic(), {**options, "global_codes": 16}, rounds=4))


def test_every_declared_pattern_is_in_the_method_declaration():
    for options in VARIANTS:
        opts = get_method("fedmm").parse_options({**FAST, **options})
        for pattern in upload_declaration(opts).patterns:
            assert pattern in FEDMM_UPLOAD.patterns


def test_end_to_end_selects_a_ctr_round_and_stores_codes(tmp_path):
    cfg = fedmm_cfg(synthetic(), {"federate_autoencoder": False}, rounds=5)
    data = prepare_data(cfg)
    result = run_seed(cfg, 0, data, tmp_path / "ckpt.ckpt", resume=False)
    first_ctr = 1 + FAST["rqvae_rounds"] + 1
    pre = [h for h in result.history if h["round"] < first_ctr]
    assert pre and all("auc" not in h for h in pre)
    assert any("perplexity_g" in h and "collision_rate" in h for h in pre)
    assert all(r >= first_ctr for r in result.selected_round.values())
    assert all(0 <= m["auc"] <= 1 for m in result.test.values())
    assert not result.failures
    # upload per market per RQ-VAE round is the codebook + usage, a few KB
    rq = [u for u in result.uploads if 1 < u["round"] < first_ctr]
    assert rq and all(set(u["keys"]) == {GLOBAL_CODEBOOK, GLOBAL_USAGE} for u in rq)
    assert all(u["bytes"] == 16 * 32 * 4 + 16 * 4 for u in rq)
    state = load_state(tmp_path / "ckpt.ckpt")
    for trainer_state in state["trainers"].values():
        c1, c2 = trainer_state["codes"]
        assert c1.max() < 16 and c2.max() < 8


def test_market_smaller_than_codebook_falls_back_to_unused_codes():
    cfg = fedmm_cfg(synthetic(items_per_market=30), {"global_codes": 64, "local_codes": 64}, rounds=4)
    data = prepare_data(cfg)
    result = run_seed(cfg, 0, data, None, resume=False)
    assert not result.failures
    assert all(np.isfinite(m["auc"]) for m in result.test.values())


def test_merge_codebooks_code_by_code_weighted_by_usage():
    prev = np.zeros((3, 2), dtype=np.float32)
    a = (np.array([[1, 1], [2, 2], [9, 9]], dtype=np.float32), np.array([1, 3, 0], dtype=np.float32))
    b = (np.array([[3, 3], [4, 4], [7, 7]], dtype=np.float32), np.array([1, 1, 0], dtype=np.float32))
    merged, usage = merge_codebooks({"a": a, "b": b}, prev)
    np.testing.assert_allclose(merged[0], [2, 2])
    np.testing.assert_allclose(merged[1], [2.5, 2.5])
    np.testing.assert_allclose(usage, [2, 4, 0])
    # code 2 is dead everywhere: re-seeded near a used code, not left at the unused uploads
    assert np.abs(merged[2] - merged[1]).max() < 0.5


def test_first_merge_clusters_uncorresponding_codes():
    a = (np.array([[0, 0], [10, 10]], dtype=np.float32), np.array([5, 5], dtype=np.float32))
    b = (
        np.array([[10.2, 10], [0.2, 0]], dtype=np.float32),
        np.array([5, 5], dtype=np.float32),
    )  # order swapped
    merged, usage = merge_codebooks({"a": a, "b": b}, None)
    assert sorted(np.round(merged[:, 0]).tolist()) == [0.0, 10.0]
    np.testing.assert_allclose(usage, [10, 10])


def test_merge_rejects_mismatched_shapes_and_nan():
    good = (np.zeros((4, 2), np.float32), np.ones(4, np.float32))
    with pytest.raises(PayloadError, match="'b'.*shape"):
        merge_codebooks({"a": good, "b": (np.zeros((5, 2), np.float32), np.ones(5, np.float32))}, None)
    bad = np.zeros((4, 2), np.float32)
    bad[1, 0] = np.nan
    with pytest.raises(PayloadError, match="'b'.*NaN"):
        merge_codebooks({"a": good, "b": (bad, np.ones(4, np.float32))}, None)


def test_runtime_drops_a_market_uploading_a_wrong_codebook():
    cfg = fedmm_cfg(synthetic(num_markets=3), rounds=4)
    method, opts, data, trainers, strategy = build(cfg)
    broken = trainers["m1"] if "m1" in trainers else list(trainers.values())[1]
    original = broken.fit_rqvae

    def wrong_shape(payload, config, step):
        update = original(payload, config, step)
        update.payload[GLOBAL_CODEBOOK] = np.zeros((17, 32), np.float32)
        return Update(update.payload, update.num_examples, update.metrics)

    broken.fit_rqvae = wrong_shape
    sim = Simulator(
        trainers, strategy, method.declaration, rounds=4, seed=0, full_ranking=False, progress=False
    )
    result = sim.run()
    failed = {(f["market"], f["round"]) for f in result.failures}
    assert (broken.market, 2) in failed and (broken.market, 3) in failed
    assert all("shape" in f["error"] for f in result.failures)
    assert len(result.test) == 3  # the others went on; the broken market still evaluates its own model


def test_bad_options_and_schedule_are_config_errors():
    with pytest.raises(ConfigError, match="codebook"):
        get_method("fedmm").parse_options({"codebook": "shared"})
    with pytest.raises(ConfigError, match="codes_dense needs codebook=global_only"):
        get_method("fedmm").parse_options({"ctr_federation": "codes_dense"})
    cfg = fedmm_cfg(synthetic(), rounds=3)  # 1 embed + 2 RQ-VAE leaves no CTR round
    with pytest.raises(ConfigError, match="train.rounds"):
        build(cfg)


def test_item_statistics_are_standardised_and_finite():
    cfg = fedmm_cfg(synthetic())
    split = next(iter(prepare_data(cfg).splits.values()))
    stats = item_statistics(split)
    assert stats.shape == (split.market.num_items, 7)
    assert np.isfinite(stats).all()


def test_code_alignment_against_chance():
    rng = np.random.default_rng(0)
    keys = np.array([f"asin{i}" for i in range(400)], dtype=object)
    codes = rng.integers(0, 8, 400)
    aligned = code_alignment({"a": codes, "b": codes.copy()}, {"a": keys, "b": keys})
    assert aligned["same_code"] == 1.0 and aligned["chance"] < 0.2
    shuffled = code_alignment({"a": codes, "b": rng.permutation(codes)}, {"a": keys, "b": keys})
    assert abs(shuffled["same_code"] - shuffled["chance"]) < 0.05
    # only shared keys count
    other = np.array([f"x{i}" for i in range(400)], dtype=object)
    assert code_alignment({"a": codes, "b": codes}, {"a": keys, "b": other})["shared_pairs"] == 0


def test_alignment_is_written_from_a_run_folder(tmp_path):
    from fedmarket.api import run_experiment
    from fedmarket.methods.fedmm import alignment_from_run

    cfg = fedmm_cfg(synthetic(), rounds=4, output_dir=str(tmp_path))
    run_dir = run_experiment(cfg)
    out = alignment_from_run(run_dir)
    assert (run_dir / "alignment.json").exists()
    assert "seed0" in out["seeds"] and "analysis only" in out["note"]


# ----------------------------------------------------------------------------- option user_codes
def test_user_codes_option_is_validated():
    assert get_method("fedmm").parse_options({}).user_codes == "none"
    assert get_method("fedmm").parse_options({"user_codes": "history"}).user_codes == "history"
    with pytest.raises(ConfigError, match=r"method\.options\.user_codes"):
        get_method("fedmm").parse_options({"user_codes": "items"})


def test_user_history_codes_on_a_hand_made_example():
    # user 0: codes 3, 1, 3 → 3; user 1: 2, 0 (tie) → 0; user 2: no interaction → reserved 5;
    # user 3: 4 → 4; user 4: 1, 2, 2, 1 (tie) → 1
    users = np.array([0, 1, 0, 3, 1, 0, 4, 4, 4, 4])
    codes = np.array([3, 2, 1, 4, 0, 3, 1, 2, 2, 1])
    np.testing.assert_array_equal(user_history_codes(users, codes, 5, vocab=5), [3, 0, 5, 4, 1])
    np.testing.assert_array_equal(user_history_codes(users[:0], codes[:0], 2, vocab=5), [5, 5])


def test_user_codes_written_from_train_interactions_and_used_in_every_scoring_path():
    cfg = fedmm_cfg(
        synthetic(),
        {"user_codes": "history"},
        rounds=5,
        eval={"full_ranking": True, "candidates": 20},
    )
    method, opts, data, trainers, strategy = build(cfg)
    sim = Simulator(
        trainers, strategy, method.declaration, rounds=5, seed=0, full_ranking=True, progress=False
    )
    result = sim.run()
    assert not result.failures
    narrow = upload_declaration(opts)
    ctr_uploads = [u for u in result.uploads if u["round"] >= 4]
    assert ctr_uploads and all(all(narrow.allows(k) for k in u["keys"]) for u in ctr_uploads)
    assert all("ctr.features.embedding.u1.weight" in u["keys"] for u in ctr_uploads)
    assert all(np.isfinite(m["auc"]) and np.isfinite(m["full_ndcg@10"]) for m in result.test.values())
    for trainer in trainers.values():
        split = trainer.split
        c1, c2 = trainer.codes
        user_x = trainer.ctr.data.user_x.numpy()
        for u in range(split.market.num_users):
            rows = split.train_users == u
            assert user_x[u, -2] == brute_force_mode(c1[split.train_items[rows]].tolist(), opts.global_codes)
            assert user_x[u, -1] == brute_force_mode(c2[split.train_items[rows]].tolist(), opts.local_codes)
        # the user fields change the scores: zeroing u1/u2 rows of the model moves the full-ranking scores
        model = trainer.ctr.model.eval()
        items = trainer.ctr.data.item_x
        users = trainer.ctr.data.user_x[:5]
        before = model.score_matrix(users, items)
        pairs = model(torch.cat([users.repeat_interleave(len(items), 0), items.repeat(5, 1)], 1))
        torch.testing.assert_close(before, pairs.view(5, -1), rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            model.features.embedding["u1"].weight.zero_()
        assert not torch.allclose(before, model.score_matrix(users, items))
