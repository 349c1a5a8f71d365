"""FeCoSR and the sequential baselines on tiny synthetic markets (hashing text encoder, a test double):
what leaves a market in each phase, the phase switch, transfer, pooling, Flower-style builds, configs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedmarket.config import config_from_dict, load_config
from fedmarket.data.split import leave_one_out
from fedmarket.data.synthetic import make_synthetic_markets
from fedmarket.errors import ConfigError
from fedmarket.federation.runtime import Simulator
from fedmarket.federation.strategies import FedAvg
from fedmarket.methods import get_method
from fedmarket.models.sasrec import LOCAL_PREFIXES

REPO = Path(__file__).resolve().parents[1]
SEQ_METHODS = (
    "fecosr",
    "seq_local_text",
    "seq_local_text_ft",
    "seq_local_id",
    "seq_fedavg",
    "seq_fedavg_id",
    "seq_transfer",
    "seq_transfer_id",
    "seq_central_shared_ids",
)


@pytest.fixture(scope="module")
def splits():
    markets = make_synthetic_markets(3, [50, 40, 30], 60, (6, 14), with_text=True, seed=5)
    return {n: leave_one_out(m, num_candidates=20, split_seed=1) for n, m in markets.items()}


def cfg_for(method: str, rounds: int = 4, **options):
    return config_from_dict(
        {
            "name": f"t_{method}",
            "dataset": {"name": "synthetic"},
            "method": {"name": method, "options": {"text_encoder": "hashing", "hidden_dim": 16, **options}},
            "model": {"name": "sasrec"},
            "train": {"rounds": rounds, "batch_size": 32, "lr": 0.005},
            "eval": {"select_metric": "ndcg@10", "candidates": 20},
            "progress": False,
        }
    )


def simulate(method, splits, rounds=4, select="best_valid", **options):
    cfg = cfg_for(method, rounds, **options)
    m = get_method(method)
    trainers, strategy = m.build(cfg, m.parse_options(cfg.method.options), splits, 0)
    sim = Simulator(
        trainers,
        strategy,
        m.declaration,
        rounds=rounds,
        seed=0,
        select=select,
        select_metric="ndcg@10",
        progress=False,
    )
    return sim, sim.run()


def test_fecosr_uploads_the_backbone_then_nothing_during_finetuning(splits):
    sim, result = simulate("fecosr", splits, rounds=4, federated_rounds=2)
    assert not result.failures
    by_round = {r: [u for u in result.uploads if u["round"] == r] for r in range(1, 5)}
    for r in (1, 2):
        assert len(by_round[r]) == 3
        for upload in by_round[r]:
            assert upload["bytes"] > 0
            assert all(
                k.startswith(("adaptor.", "position.", "blocks.", "final_norm.")) for k in upload["keys"]
            )
            assert not any(k.startswith(LOCAL_PREFIXES) for k in upload["keys"])
    for r in (3, 4):  # local fine-tuning: NOTHING leaves a market
        assert [u["bytes"] for u in by_round[r]] == [0, 0, 0]
        assert all(u["keys"] == {} for u in by_round[r])
    # the server sends the final global model once (round 3), then nothing
    assert sim.strategy.configure_train(4, list(splits)) == {m: {} for m in splits}
    for trainer in sim.trainers.values():
        assert trainer.finetuning
        assert float(trainer.model.id_embedding.weight.detach().abs().sum()) > 0  # the local module trained


def test_finetuning_client_never_uploads_even_if_asked(splits):
    from fedmarket.federation.core import RoundConfig

    cfg = cfg_for("fecosr", federated_rounds=1)
    m = get_method("fecosr")
    trainers, _ = m.build(cfg, m.parse_options(cfg.method.options), splits, 0)
    client = trainers["m0"]
    update = client.fit({}, RoundConfig(2, 1, 0, {"finetune": True, "upload": True}))
    assert update.payload == {}


def test_federated_pretraining_gives_every_market_the_same_backbone(splits):
    sim, _ = simulate("fecosr", splits, rounds=2, federated_rounds=2)
    payloads = sim.strategy.configure_evaluate(2, list(splits))
    for trainer in sim.trainers.values():
        trainer.evaluate(payloads[trainer.market], "valid")
    states = [t.model.state_dict() for t in sim.trainers.values()]
    for key in states[0]:
        if key.startswith(("blocks.", "adaptor.")):
            for other in states[1:]:
                torch.testing.assert_close(states[0][key], other[key])


def test_initial_backbones_are_identical_across_markets(splits):
    cfg = cfg_for("fecosr")
    m = get_method("fecosr")
    trainers, _ = m.build(cfg, m.parse_options(cfg.method.options), splits, 0)
    payloads = [t.initial_payload() for t in trainers.values()]
    for key in payloads[0]:
        for other in payloads[1:]:
            np.testing.assert_array_equal(payloads[0][key], other[key])


def test_transfer_trains_only_the_source_then_fine_tunes_everyone(splits):
    sim, result = simulate("seq_transfer", splits, rounds=3, source_rounds=1)
    assert sim.strategy.source == "m0"  # the largest market
    round1 = [u for u in result.uploads if u["round"] == 1]
    assert {u["market"] for u in round1 if u["bytes"] > 0} == {"m0"}
    assert all(u["bytes"] == 0 for u in result.uploads if u["round"] > 1)
    assert set(result.test) == set(splits)  # the source market is reported too
    assert all(t.finetuning for t in sim.trainers.values())


def test_local_text_ft_is_local_text_then_the_market_module_with_nothing_sent(splits):
    # select the last round: the trainers then hold the fine-tuned state (with best_valid they would hold
    # whichever round validated best, possibly one before the module started)
    sim, result = simulate("seq_local_text_ft", splits, rounds=4, select="last", federated_rounds=2)
    assert not result.failures
    assert all(u["bytes"] == 0 and u["keys"] == {} for u in result.uploads)
    assert all(sim.strategy.configure_train(r, list(splits)) == {m: {} for m in splits} for r in range(1, 5))
    for trainer in sim.trainers.values():
        assert trainer.finetuning
        assert float(trainer.model.id_embedding.weight.detach().abs().sum()) > 0  # the module trained
    # the first stage is Local text-SASRec: the same validation numbers round by round; then the module
    _, local = simulate("seq_local_text", splits, rounds=3)

    def valid(res, rounds):
        return [
            (h["round"], h["market"], h["ndcg@10"])
            for h in res.history
            if h["split"] == "valid" and h["round"] in rounds
        ]

    assert valid(result, (1, 2)) == valid(local, (1, 2))
    assert valid(result, (3,)) != valid(local, (3,))
    with pytest.raises(ConfigError, match="federated_rounds"):
        get_method("seq_local_text_ft").parse_options({"federated_rounds": 0})


def test_central_pools_items_by_their_raw_key(splits):
    cfg = cfg_for("seq_central_shared_ids")
    m = get_method("seq_central_shared_ids")
    trainers, _ = m.build(cfg, m.parse_options(cfg.method.options), splits, 0)
    data = trainers["pooled"].data
    keys = np.concatenate([s.market.item_ids.astype(str) for s in splits.values()])
    assert data.num_items == len(set(keys))
    assert set(trainers["pooled"].evaluate(None, "valid")) == set(splits)
    assert not m.private


@pytest.mark.parametrize("method", ["seq_local_id", "seq_fedavg_id", "seq_transfer_id"])
def test_id_only_rows_never_upload_id_embeddings(splits, method):
    _, result = (
        simulate(method, splits, rounds=2, source_rounds=1)
        if "transfer" in method
        else simulate(method, splits, rounds=2)
    )
    sizes = {s.market.num_items for s in splits.values()}
    for upload in result.uploads:
        for key, shape in upload["keys"].items():
            assert not key.startswith("id_embedding") and not (set(shape) & sizes), key


@pytest.mark.parametrize("method", SEQ_METHODS)
def test_build_without_data_returns_no_trainers(method):
    m = get_method(method)
    cfg = cfg_for(method, source_market="m0") if "transfer" in method else cfg_for(method)
    trainers, strategy = m.build(cfg, m.parse_options(cfg.method.options), {}, 0)
    assert trainers == {} and strategy is not None
    assert m.task == "seq"


def test_same_seed_same_numbers(splits):
    _, a = simulate("fecosr", splits, rounds=2, federated_rounds=1)
    _, b = simulate("fecosr", splits, rounds=2, federated_rounds=1)
    assert a.test == b.test


def test_options_are_validated():

    m = get_method("fecosr")
    with pytest.raises(ConfigError, match="lam"):
        m.parse_options({"lam": 1.5})
    with pytest.raises(ConfigError, match="text_encoder"):
        m.parse_options({"text_encoder": "tfidf"})
    with pytest.raises(ConfigError, match="server_lr"):
        m.parse_options({"server_lr": 0})
    with pytest.raises(ConfigError, match="server_momentum"):
        m.parse_options({"server_momentum": 1.0})
    with pytest.raises(ConfigError, match="method.options.server_optimizer"):
        m.parse_options({"server_optimizer": "adagrad"})


def test_server_lr_steps_the_federated_backbone_and_leaves_fine_tuning_private(splits, monkeypatch):
    starts = []
    original = FedAvg.initialize
    monkeypatch.setattr(FedAvg, "initialize", lambda self, p: (starts.append(p), original(self, p))[1])
    plain, _ = simulate("fecosr", splits, rounds=1, federated_rounds=2)
    fast, result = simulate("fecosr", splits, rounds=3, federated_rounds=2, server_lr=2.0)
    assert fast.strategy.server_lr == 2.0
    heavy, moved = simulate("fecosr", splits, rounds=3, federated_rounds=2, server_momentum=0.5)
    assert heavy.strategy.server_momentum == 0.5 and heavy.strategy.velocity  # the server keeps the velocity
    assert all(u["bytes"] == 0 for u in moved.uploads if u["round"] == 3)
    assert all(u["bytes"] == 0 for u in result.uploads if u["round"] == 3)  # fine-tuning uploads nothing
    adam, stepped = simulate(
        "fecosr", splits, rounds=3, federated_rounds=2, server_optimizer="adam", server_lr=0.01
    )
    assert adam.strategy.server.name == "adam" and any(
        k.startswith("second_moment/") for k in adam.strategy.velocity
    )
    assert all(u["bytes"] == 0 for u in stepped.uploads if u["round"] == 3)
    # round 1 trains the same uploads; η_g = 2 takes the server twice as far from the start as FedAvg's mean
    once, _ = simulate("fecosr", splits, rounds=1, federated_rounds=2, server_lr=2.0)
    start, mean = starts[0], plain.strategy.global_payload
    for key in (next(k for k in mean if k.startswith(prefix)) for prefix in ("adaptor.", "blocks.")):
        np.testing.assert_allclose(
            once.strategy.global_payload[key],
            start[key] + 2.0 * (mean[key] - start[key]),
            rtol=1e-5,
            atol=1e-6,
        )
        assert np.abs(mean[key] - start[key]).max() > 0


def test_sequential_configs_load():
    paths = sorted(REPO.glob("configs/movielens-*_*.yaml")) + sorted(REPO.glob("configs/xmrec_seq_*.yaml"))
    assert len(paths) >= 8
    for path in paths:
        cfg = load_config(path)
        m = get_method(cfg.method.name)
        if m.task in ("floor", "ctr"):  # the sequential tables' floors; the onboarding study's CTR federation
            continue
        assert m.task == "seq"
        opts = m.parse_options(cfg.method.options)
        assert opts.text_encoder == "minilm", f"{path.name}: reported results must use MiniLM"
        assert cfg.eval.select_metric == "ndcg@10"


def test_xmarket_metadata_text_plugs_into_the_text_model(tmp_path, splits):
    """Real XMarket text (JSON lines with asin, title, categories) feeds FeCoSR unchanged."""
    import json

    from fedmarket.data.xmarket import attach_item_text, load_xmarket_metadata

    market = splits["m2"].market
    path = tmp_path / "metadata_jp_Electronics.json"
    with path.open("w") as f:
        for i, asin in enumerate(market.item_ids[:-3]):  # a few items without metadata
            f.write(
                json.dumps(
                    {"asin": asin, "title": f"Cable {i % 5}", "categories": [["Electronics", "Cables"]]}
                )
            )
            f.write("\n")
    with_text = attach_item_text(market, load_xmarket_metadata(path))
    split = leave_one_out(with_text, num_candidates=20, split_seed=1)
    cfg = cfg_for("fecosr", rounds=1)
    m = get_method("fecosr")
    trainers, _ = m.build(cfg, m.parse_options(cfg.method.options), {"m2": split}, 0)
    metrics = trainers["m2"].evaluate(None, "valid")["m2"]
    assert 0 <= metrics["ndcg@10"] <= 1


def test_pretraining_tested_at_its_plateau_is_fecosr_without_fine_tuning(splits):
    """The phase end of FeCoSR records the pre-trained model's test metrics: exactly FeCoSR without
    fine-tuning (federated_rounds 0) run to the same plateau, so that row costs no extra run."""

    def run(federated_rounds):
        cfg = cfg_for("fecosr", 10, federated_rounds=federated_rounds)
        m = get_method("fecosr")
        trainers, strategy = m.build(cfg, m.parse_options(cfg.method.options), splits, 0)
        sim = Simulator(
            trainers,
            strategy,
            m.declaration,
            rounds=10,
            seed=0,
            select_metric="ndcg@10",
            progress=False,
            patience=1,
            min_delta=0.5,
        )
        return sim.run()

    phased, alone = run(10), run(0)
    assert phased.convergence["phase_ends"] == [2] and alone.convergence["converged_round"] == 2
    assert [p["round"] for p in phased.phase_tests] == [2]
    assert phased.phase_tests[0]["test"] == alone.test
    assert alone.phase_tests == []
