"""`fedmarket status`: run folders found under a root, pending seeds, and errors that name the path.
(A running, stalled and finished seed of a real run: tests/test_cli_integration.py, the killed-run test.)"""

from __future__ import annotations

import pytest
import yaml

from fedmarket.cli import main
from fedmarket.errors import FedmarketError
from fedmarket.status import find_run_dirs, format_status, run_status, without_merged_copies


def _run_folder(root, name, seeds):
    d = root / name
    (d / "checkpoints").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"name": name, "seeds": seeds, "train": {"rounds": 5}}))
    return d


def test_finds_run_folders_below_a_root_and_lists_pending_seeds(tmp_path):
    a = _run_folder(tmp_path / "grid" / "seed0", "a", [0, 1])
    b = _run_folder(tmp_path / "grid" / "seed1", "b", [1])
    (a / "checkpoints" / "seed7.ckpt").write_bytes(b"not a checkpoint")
    assert find_run_dirs([tmp_path / "grid"]) == [a, b]
    rows = run_status(a)
    assert [(r["seed"], r["state"]) for r in rows] == [(0, "pending"), (1, "pending"), (7, "unreadable")]
    text = format_status(rows + run_status(b))
    assert "seed 0: pending" in text and "checkpoint unreadable" in text and text.splitlines()[-2] == "b"


def test_a_grids_merged_copy_is_listed_once(tmp_path, capsys):
    grid = tmp_path / "grid"
    seed0 = _run_folder(grid / "seed0", "a-20261130", [0])
    (seed0 / "config.yaml").write_text(yaml.safe_dump({"name": "a", "seeds": [0], "train": {"rounds": 5}}))
    merged = _run_folder(grid / "merged", "a", [0])
    other = _run_folder(grid / "merged", "b", [0])  # merged from per-seed folders not listed: kept
    assert without_merged_copies(find_run_dirs([grid])) == [other, seed0]
    assert without_merged_copies([merged]) == [merged]
    assert main(["status", str(grid)]) == 0
    assert capsys.readouterr().out.count("seed 0: pending") == 2


def test_bad_paths_are_named(tmp_path, capsys):
    with pytest.raises(FedmarketError, match="does not exist"):
        find_run_dirs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedmarketError, match="holds no run folder"):
        find_run_dirs([tmp_path / "empty"])
    with pytest.raises(FedmarketError, match="config.yaml is missing"):
        run_status(tmp_path / "empty")
    assert main(["status", str(tmp_path / "nope")]) != 0
    assert "nope" in capsys.readouterr().err
    _run_folder(tmp_path, "r", [0])
    assert main(["status", str(tmp_path / "r"), "--stale-after", "0"]) != 0
    assert "--stale-after" in capsys.readouterr().err


def test_a_done_seed_with_per_market_selected_rounds_shows_their_range() -> None:
    row = {"run": "r", "seed": 1, "state": "done", "round": 199, "phase_ends": [150], "seconds": 4680}
    row |= {"selected_round": {"a": 179, "b": 199}, "test": ("full_ndcg@10", 0.1153)}
    text = format_status([row])
    assert "199 rounds, first phase ended at 150, selected rounds 179–199 (per market)" in text
    assert "full_ndcg@10 0.1153, 78 min" in text
    assert "selected round 7," in format_status([row | {"selected_round": 7}])
