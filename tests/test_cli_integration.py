"""End to end through the CLI on real XMarket slices (2 markets, 2 rounds)."""

import json
import time
from pathlib import Path

import pytest
import yaml

from fedmarket.cli import main

pytestmark = pytest.mark.slow


def write_config(tmp_path: Path, data_dir: Path, method: str, **extra) -> Path:
    cfg = {
        "name": f"it_{method}",
        "dataset": {"name": "xmrec", "markets": ["in", "jp"], "data_dir": str(data_dir)},
        "method": {"name": method},
        "train": {"rounds": 2, "batch_size": 512},
        "output_dir": str(tmp_path / "runs"),
        "progress": False,
        **extra,
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def only_run(tmp_path: Path, name: str) -> Path:
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(name)]
    return run


def test_run_writes_the_documented_run_folder(tmp_path, data_dir, capsys):
    assert main(["run", str(write_config(tmp_path, data_dir, "fedavg"))]) == 0
    run = only_run(tmp_path, "it_fedavg")
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("method", "dataset", "per_market", "average", "communication", "seeds"):
        assert key in metrics
    assert set(metrics["per_market"]) == {"in", "jp"}
    for m in ("auc", "logloss", "gauc", "hr@10", "ndcg@10", "mrr@10", "full_ndcg@10"):
        assert m in metrics["per_market"]["in"]
    assert 0.5 < metrics["average"]["auc"] < 1
    assert metrics["communication"]["in"]["up_bytes"] > 0
    for name in ("config.yaml", "rounds.csv", "uploads.csv", "report.md", "checkpoints/seed0.ckpt"):
        assert (run / name).exists(), name
    assert list(run.glob("*.png"))
    report = (run / "report.md").read_text()
    assert "upload audit" in report and "dnn.0.weight" in report and "features.embedding" not in report
    assert "run folder" in capsys.readouterr().out


def test_resume_of_a_killed_run_gives_the_uninterrupted_numbers(tmp_path, data_dir, monkeypatch, capsys):
    from fedmarket.federation.runtime import Simulator

    config = write_config(tmp_path, data_dir, "fedprox", seeds=[0])
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["rounds"] = 3
    config.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(config)]) == 0
    full = json.loads((only_run(tmp_path, "it_fedprox") / "metrics.json").read_text())

    cfg["name"] = "it_killed"
    config.write_text(yaml.safe_dump(cfg))
    original = Simulator.run_round

    def dying(self, server_round):
        if server_round == 3:
            raise KeyboardInterrupt
        original(self, server_round)

    monkeypatch.setattr(Simulator, "run_round", dying)
    assert main(["run", str(config)]) == 130  # Ctrl-C: one line naming the resume command
    killed = only_run(tmp_path, "it_killed")
    assert f"continue with: fedmarket run --resume {killed}" in capsys.readouterr().err
    assert not (killed / "metrics.json").exists()
    # `fedmarket status` reads where the killed seed stands from its checkpoint
    from fedmarket.status import run_status

    (row,) = run_status(killed)
    assert row["state"] == "running" and row["round"] == 2 and row["max_rounds"] == 3
    assert row["best"][0] in (1, 2) and 0.5 < row["latest"] < 1
    (row,) = run_status(killed, now=time.time() + 3 * 3600)
    assert row["state"] == "stalled"
    time.sleep(0.2)  # older than --stale-after 0.001 min
    assert main(["status", str(tmp_path / "runs"), "--stale-after", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "round 2/3" in out and "continue with --resume" in out and "seed 0: done" in out
    monkeypatch.setattr(Simulator, "run_round", original)
    assert main(["run", "--resume", str(killed)]) == 0
    resumed = json.loads((killed / "metrics.json").read_text())
    assert resumed["per_market"] == full["per_market"]
    assert resumed["communication"] == full["communication"]
    (row,) = run_status(killed)
    assert row["state"] == "done" and row["round"] == 3 and row["test"][0] == "auc"


def test_report_combines_runs(tmp_path, data_dir):
    for method in ("local", "fedper"):
        assert (
            main(["run", str(write_config(tmp_path, data_dir, method)), "--set", "eval.full_ranking=false"])
            == 0
        )
    runs = [str(only_run(tmp_path, "it_local")), str(only_run(tmp_path, "it_fedper"))]
    assert main(["report", *runs, "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "report.md").read_text()
    assert "local-deepfm" in text and "fedper-deepfm" in text
    assert (tmp_path / "cmp" / "auc_per_market.png").exists()


def test_data_info(capsys, data_dir):
    assert main(["data", "info", "xmrec", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "ca" in out and "4668" in out and "44779" in out


def test_errors_are_reported_not_raised(tmp_path, data_dir, capsys):
    bad = write_config(tmp_path, data_dir, "fedavg")
    bad.write_text(bad.read_text().replace("rounds: 2", "rounds: -2"))
    assert main(["run", str(bad)]) == 2
    assert "train.rounds" in capsys.readouterr().err
    unknown = write_config(tmp_path, data_dir, "fedavg")
    unknown.write_text(unknown.read_text().replace("- in", "- xx"))
    assert main(["run", str(unknown)]) == 2
    assert "xx" in capsys.readouterr().err
