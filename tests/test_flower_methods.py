"""Every federated method gives the same per-market metrics in-process and through Flower.

The ServerApp (`FlowerServer`) drives the real ClientApp handler (`fedmarket.flower.client.handle`) through
the in-memory Grid of `test_flower_app` (each node its own Context and state folder, exactly what a SuperNode
hands the handler), so multi-stage schedules (FedMM's embedding → RQ-VAE → CTR phases, FeCoSR's federated
pre-training then local fine-tuning where nothing is uploaded, MTL fine-tune phases), personalised downloads
(PF-MSMTrec sends each scenario its own mixture) and the market-local state across messages are all
exercised. Each ClientApp message rebuilds the trainer from the market's own state folder, as a fresh
Deployment-Engine process would (the process cache is cleared before every message).

Tolerance: exact equality of ``per_market``, ``communication`` and ``selected_round``. Both runtimes run
the method's own `ClientTrainer` on the same single-market data (splits depend only on the split seed and
the market), derive every random draw from (seed, market, round, epoch), move payloads as bit-exact arrays,
aggregate in market order and run torch with one intra-op thread, so there is no source of float drift; a
difference of even 1 ulp would point to state that is not carried across messages, and is a bug.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_flower_app import MemoryGrid

from fedmarket.api import run_experiment
from fedmarket.config import config_from_dict
from fedmarket.flower import client as flower_client
from fedmarket.flower.server import FlowerServer

SYNTH = {
    "num_markets": 2,
    "users_per_market": [60, 40],
    "items_per_market": 60,
    "interactions_per_user": [5, 8],
}
FEDMM_FAST = {
    "embedding_epochs": 2,
    "rqvae_rounds": 2,
    "rqvae_epochs": 2,
    "global_codes": 16,
    "local_codes": 8,
}

MTL_DATASET = {
    "name": "synthetic-mtl",
    "markets": ["m0", "m1", "m2"],
    "options": {
        "num_markets": 3,
        "users_per_market": 40,
        "items_per_market": 60,
        "interactions_per_user": [8, 15],
    },
}
MTL_MODEL = {"name": "mmoe", "embed_dim": 4, "hidden": [8], "tower_hidden": [4], "num_experts": 4}

CONFIGS = {
    "fedmm": {
        "dataset": {"name": "synthetic", "markets": ["m0", "m1"], "options": SYNTH},
        "method": {"name": "fedmm", "options": FEDMM_FAST},
        "train": {"rounds": 5, "batch_size": 4096},
        "eval": {"full_ranking": False, "candidates": 20},
    },
    "pfmsmt": {
        "dataset": MTL_DATASET,
        "method": {"name": "pfmsmt"},
        "model": MTL_MODEL,
        "train": {"rounds": 3, "batch_size": 256},
        "eval": {"select_metric": "mean_auc"},
    },
    "mtl_fedavg_ft": {
        "dataset": MTL_DATASET,
        "method": {"name": "mtl_fedavg_ft", "options": {"federated_rounds": 1}},
        "model": MTL_MODEL,
        "train": {"rounds": 3, "batch_size": 256},
        "eval": {"select_metric": "mean_auc"},
    },
    # early stopping (train.patience): the federated phase ends at its plateau (round 2), fine-tuning at its own
    "mtl_fedavg_ft_patience": {
        "dataset": MTL_DATASET,
        "method": {"name": "mtl_fedavg_ft", "options": {"federated_rounds": 4}},
        "model": MTL_MODEL,
        "train": {"rounds": 6, "batch_size": 256, "patience": 1, "min_delta": 0.5},
        "eval": {"select_metric": "mean_auc"},
    },
    # train.phase_patience 0: the federated phase runs all its rounds (3), fine-tuning stops at its plateau
    # (with the slope guard on: a window of 2 fine-tuning rounds, any slope <= 1 passes; the server must pass
    # it on, or metrics.json's convergence differs)
    "mtl_fedavg_ft_fixed_pretraining": {
        "dataset": MTL_DATASET,
        "method": {"name": "mtl_fedavg_ft", "options": {"federated_rounds": 3}},
        "model": MTL_MODEL,
        "train": {
            "rounds": 6,
            "batch_size": 256,
            "patience": 1,
            "min_delta": 0.5,
            "phase_patience": 0,
            "stop_slope": 1.0,
            "slope_window": 2,
        },
        "eval": {"select_metric": "mean_auc"},
    },
    # the PF-MSMTrec + local fine-tune variant: personalised federation ends at its plateau, then fine-tuning
    "pfmsmt_ft_patience": {
        "dataset": MTL_DATASET,
        "method": {"name": "pfmsmt", "options": {"federated_rounds": 4}},
        "model": MTL_MODEL,
        "train": {"rounds": 6, "batch_size": 256, "patience": 1, "min_delta": 0.5},
        "eval": {"select_metric": "mean_auc"},
    },
    "fecosr": {
        "dataset": {
            "name": "synthetic",
            "markets": ["m0", "m1"],
            "options": {
                "num_markets": 2,
                "users_per_market": [50, 30],
                "items_per_market": 60,
                "interactions_per_user": [6, 14],
                "with_text": True,
            },
        },
        "method": {
            "name": "fecosr",
            "options": {"text_encoder": "hashing", "hidden_dim": 16, "federated_rounds": 2},
        },
        "model": {"name": "sasrec"},
        "train": {"rounds": 3, "batch_size": 32, "lr": 0.005},
        "eval": {"select_metric": "ndcg@10", "candidates": 20, "full_ranking": False},
    },
}
# FedAdam's moments are server state carried across rounds in the ServerApp, as in process
CONFIGS["fecosr_fedadam"] = json.loads(json.dumps(CONFIGS["fecosr"]))
CONFIGS["fecosr_fedadam"]["method"]["options"].update(
    server_optimizer="adam", server_lr=0.01, server_momentum=0.9
)


class FreshProcessGrid(MemoryGrid):
    """Every message is served as by a fresh ClientApp process: nothing cached from earlier messages."""

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            flower_client._TRAINERS.clear()
            ids += super().push_messages([msg])
        return ids


def experiment(tmp_path: Path, method: str) -> dict:
    return {
        "name": f"eq_{method}",
        "output_dir": str(tmp_path / "runs"),
        "progress": False,
        **json.loads(json.dumps(CONFIGS[method])),
    }


pytestmark = pytest.mark.usefixtures("fresh_flower_client")


# (first phase's end, converged round) of the configs with train.patience
PHASES = {
    "mtl_fedavg_ft_patience": (2, 4),
    "pfmsmt_ft_patience": (2, 4),
    "mtl_fedavg_ft_fixed_pretraining": (3, 5),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_method_over_flower_equals_in_process(tmp_path, method):
    cfg_dict = experiment(tmp_path, method)
    expected = json.loads((run_experiment(config_from_dict(cfg_dict)) / "metrics.json").read_text())
    markets = cfg_dict["dataset"]["markets"]
    grid = FreshProcessGrid(
        {100 + i: {"market": m, "state-dir": str(tmp_path / "state" / m)} for i, m in enumerate(markets)}
    )
    run_dir = tmp_path / "flower_run"
    FlowerServer(grid, config_from_dict(cfg_dict), run_dir, wait_nodes=0).run()
    got = json.loads((run_dir / "metrics.json").read_text())
    assert got["failures"] == expected["failures"] == []
    assert got["per_market"] == expected["per_market"]
    assert got["communication"] == expected["communication"]
    assert got["selected_round"] == expected["selected_round"]
    assert got["convergence"] == expected["convergence"]
    phase_end, converged = PHASES.get(method, (None, None))
    if cfg_dict["train"].get("stop_slope") is not None:
        assert got["convergence"]["0"]["stop_slope"] == cfg_dict["train"]["stop_slope"]
    if cfg_dict["train"].get("patience"):
        assert expected["convergence"]["0"]["phase_ends"] == [phase_end]
        assert expected["convergence"]["0"]["converged_round"] == converged
    assert set(got["per_market"]) == set(markets)
    # the validation history of every round (every phase of a multi-stage schedule) too
    inproc_dir = next(p for p in (tmp_path / "runs").iterdir() if p.name.startswith("eq_"))
    assert (run_dir / "rounds.csv").read_text() == (inproc_dir / "rounds.csv").read_text()
    assert (run_dir / "uploads.csv").read_text() == (inproc_dir / "uploads.csv").read_text()
    # a phase end's test of the run stopped there (the "without fine-tuning" row), recorded by both runtimes
    phases = [
        json.loads((d / "seeds" / "seed0.json").read_text())["phase_tests"] for d in (run_dir, inproc_dir)
    ]
    assert phases[0] == phases[1]
    assert [p["round"] for p in phases[0]] == ([phase_end] if phase_end else [])


def test_privacy_secagg_and_attack_configs_run_on_flower(tmp_path):
    # DP and the attack simulation: tests/test_flower_privacy.py; SecAgg+: tests/test_flower_secagg.py
    from fedmarket.flower.server import server_strategy
    from fedmarket.methods import get_method

    for extra in (
        {"privacy": {"mode": "client"}},
        {"secure_aggregation": {"enabled": True}},
        {"attack": {"markets": ["m0"]}},
    ):
        server_strategy(get_method("fedmm"), config_from_dict({**experiment(tmp_path, "fedmm"), **extra}), 0)
