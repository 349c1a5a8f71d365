"""Client-level DP (and the attack simulation) through the Flower apps: the ClientApp applies the same
market-side wrappers (clipping, local noise, poisoning) and the ServerApp the same server-side ones (noise on
the sum, the accountant, target-ε stop) as the in-process runtime, so a DP config gives the same per-market
metrics and the same ε per round through the in-memory Grid (same seed: every noise draw is seeded by
(seed, market, round))."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from test_flower_app import MemoryGrid

from fedmarket.api import run_experiment
from fedmarket.config import config_from_dict
from fedmarket.flower.server import FlowerServer

pytestmark = pytest.mark.usefixtures("fresh_flower_client")


def small(tmp_path, **extra) -> dict:
    return {
        "name": "dp_flower",
        "dataset": {
            "name": "synthetic",
            "markets": ["m0", "m1", "m2"],
            "options": {"num_markets": 3, "users_per_market": [50, 30, 40], "items_per_market": 40},
        },
        "method": {"name": "fedavg"},
        "model": {"hidden": [8], "embed_dim": 4},
        "train": {"rounds": 3, "batch_size": 256},
        "eval": {"full_ranking": False, "candidates": 9},
        "output_dir": str(tmp_path / "runs"),
        "progress": False,
        **extra,
    }


def grid_for(tmp_path, markets=("m0", "m1", "m2")) -> MemoryGrid:
    return MemoryGrid(
        {100 + i: {"market": m, "state-dir": str(tmp_path / "state" / m)} for i, m in enumerate(markets)}
    )


def both_runtimes(tmp_path, cfg_dict):
    inproc = run_experiment(config_from_dict(cfg_dict))
    flower_dir = tmp_path / "flower_run"
    FlowerServer(grid_for(tmp_path), config_from_dict(cfg_dict), flower_dir, wait_nodes=0).run()
    return inproc, flower_dir


@pytest.mark.parametrize(
    "privacy",
    [
        {"mode": "server", "clip_norm": 0.5, "noise_multiplier": 1.0, "target_epsilon": 8.0},
        {"mode": "client", "clip_norm": 0.5, "noise_multiplier": 2.0, "clipping": "per_key"},
    ],
    ids=["server", "client"],
)
def test_dp_over_flower_equals_in_process_metrics_and_epsilon(tmp_path, privacy):
    inproc, flower_dir = both_runtimes(tmp_path, small(tmp_path, privacy=privacy))
    expected = json.loads((inproc / "metrics.json").read_text())
    got = json.loads((flower_dir / "metrics.json").read_text())
    assert got["per_market"] == expected["per_market"]
    assert got["selected_round"] == expected["selected_round"]
    for key in ("mode", "epsilon", "rounds", "stopped_before_round", "server_step"):
        assert got["privacy"][key] == expected["privacy"][key], key
    assert got["privacy"]["epsilon"] > 0
    assert not any("WARNING" in n for n in got["notes"])  # the wrappers were applied: no warning
    if privacy["mode"] == "server":
        assert got["privacy"]["stopped_before_round"] == 3  # the target-ε stop happens on Flower too
    rounds_flower = pd.read_csv(flower_dir / "rounds.csv")
    rounds_inproc = pd.read_csv(inproc / "rounds.csv")
    assert {"epsilon", "train_dp_update_norm"} <= set(rounds_flower.columns)
    pd.testing.assert_series_equal(rounds_flower["epsilon"], rounds_inproc["epsilon"])


def test_attack_simulation_over_flower_equals_in_process(tmp_path):
    cfg = small(tmp_path, attack={"markets": ["m1"], "kind": "sign_flip", "scale": 3.0}, train={"rounds": 2})
    inproc, flower_dir = both_runtimes(tmp_path, cfg)
    expected = json.loads((inproc / "metrics.json").read_text())
    got = json.loads((flower_dir / "metrics.json").read_text())
    assert got["per_market"] == expected["per_market"]
    assert any("ATTACK SIMULATION" in n for n in got["notes"])
    assert not any("WARNING" in n for n in got["notes"])
