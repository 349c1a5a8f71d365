"""DP, secure aggregation and the attack simulation through `run_experiment` on small synthetic markets:
ε per round in rounds.csv and metrics.json, the report's privacy section, the secure-aggregation record."""

import json

import pandas as pd
import pytest

from fedmarket.api import run_experiment
from fedmarket.config import config_from_dict
from fedmarket.errors import ConfigError


def small(tmp_path, **extra):
    cfg = {
        "name": "dp_test",
        "dataset": {
            "name": "synthetic",
            "options": {"num_markets": 3, "users_per_market": 40, "items_per_market": 30},
            "use_cache": False,
        },
        "method": {"name": "fedavg"},
        "model": {"hidden": [8], "embed_dim": 4},
        "train": {"rounds": 3, "batch_size": 256},
        "eval": {"full_ranking": False, "candidates": 5},
        "output_dir": str(tmp_path),
        "progress": False,
    }
    cfg.update(extra)
    return config_from_dict(cfg)


def test_dp_server_with_secure_aggregation_end_to_end(tmp_path):
    cfg = small(
        tmp_path,
        privacy={"mode": "server", "clip_norm": 0.5, "noise_multiplier": 1.0, "target_epsilon": 8.0},
        secure_aggregation={"enabled": True},
    )
    run_dir = run_experiment(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    privacy = metrics["privacy"]
    assert privacy["mode"] == "server" and 0 < privacy["epsilon"] <= 8.0
    # PLD accountant (the default): ε = 4.38, 6.57 after rounds 1, 2; 8.39 after 3 > 8
    assert privacy["stopped_before_round"] == 3
    assert privacy["secure_aggregation"]["secured_rounds"] == [1, 2]
    rounds = pd.read_csv(run_dir / "rounds.csv")
    assert {"epsilon", "train_dp_update_norm"} <= set(rounds.columns)
    assert rounds.groupby("round")["epsilon"].first().is_monotonic_increasing
    report = (run_dir / "report.md").read_text()
    assert "## Privacy guarantees" in report and "Target ε = 8" in report and "weighted sum" in report


def test_attack_and_robust_aggregation_end_to_end(tmp_path):
    cfg = small(
        tmp_path,
        method={"name": "fedavg", "options": {"aggregation": "median"}},
        attack={"markets": ["m1"], "kind": "noise", "scale": 5.0},
        secure_aggregation={"enabled": True},
    )
    run_dir = run_experiment(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert any("ATTACK SIMULATION" in n for n in metrics["notes"])
    secure = metrics["privacy"]["secure_aggregation"]
    assert secure["secured_rounds"] == [] and secure["clear_rounds"] == [1, 2, 3]
    report = (run_dir / "report.md").read_text()
    assert "not a sum" in report and "median" in report


def test_unknown_attack_market_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="attack.markets"):
        run_experiment(small(tmp_path, attack={"markets": ["mars"]}))


def test_documented_privacy_config_block_is_valid():
    from pathlib import Path

    import yaml

    readme = (Path(__file__).parents[1] / "docs" / "privacy.md").read_text()
    section = readme.split("# Privacy and robustness", 1)[1]
    block = section.split("```yaml", 1)[1].split("```", 1)[0]
    cfg = config_from_dict(yaml.safe_load(block))
    assert cfg.privacy.mode == "server" and cfg.secure_aggregation.enabled and cfg.attack.markets == ["uk"]
