"""`fedmarket merge`: seeds run in separate processes/folders merge into the same metrics as one run of all
seeds; mismatched configs, duplicate seeds and unfinished seeds are refused, and nothing is left behind."""

import json
from pathlib import Path

import pytest

from fedmarket.api import run_experiment
from fedmarket.config import config_from_dict
from fedmarket.errors import FedmarketError
from fedmarket.lab.runs import first_phase_run, merge_grid, merge_runs


def small(tmp_path, seeds, **extra):
    cfg = {
        "name": "merge_test",
        "dataset": {
            "name": "synthetic",
            "options": {"num_markets": 2, "users_per_market": 30, "items_per_market": 25},
            "use_cache": False,
        },
        "method": {"name": "fedavg"},
        "model": {"hidden": [8], "embed_dim": 4},
        "train": {"rounds": 2, "batch_size": 256},
        "eval": {"full_ranking": False, "candidates": 5},
        "output_dir": str(tmp_path),
        "progress": False,
        "seeds": seeds,
    }
    cfg.update(extra)
    return config_from_dict(cfg)


def test_merge_equals_one_run_of_all_seeds(tmp_path):
    both = run_experiment(small(tmp_path / "both", [0, 1]))
    a = run_experiment(small(tmp_path / "a", [0]))
    b = run_experiment(small(tmp_path / "b", [1]))
    # FedMM's analysis-only alignment files merge too (mean over the seeds)
    (a / "alignment.json").write_text(
        json.dumps({"note": "n", "seeds": {"0": {"same_code": 0.2, "chance": 0.1}}})
    )
    (b / "alignment.json").write_text(
        json.dumps({"note": "n", "seeds": {"1": {"same_code": 0.4, "chance": 0.1}}})
    )
    merged = merge_runs([a, b], tmp_path / "merged")
    alignment = json.loads((merged / "alignment.json").read_text())
    assert sorted(alignment["seeds"]) == ["0", "1"] and alignment["note"] == "n"
    assert abs(alignment["same_code"] - 0.3) < 1e-12 and abs(alignment["lift"] - 3.0) < 1e-9
    m1 = json.loads((both / "metrics.json").read_text())
    m2 = json.loads((merged / "metrics.json").read_text())
    assert m2["seeds"] == [0, 1]
    assert m2["per_market"] == m1["per_market"]
    assert m2["average_std"] == m1["average_std"]
    assert m2["communication"] == m1["communication"]
    assert (merged / "rounds.csv").read_text() == (both / "rounds.csv").read_text()
    # the grid form finds both single-seed folders by config name
    (out,) = merge_grid(tmp_path / "a", tmp_path / "grid1")
    assert json.loads((out / "metrics.json").read_text())["seeds"] == [0]


def test_merge_refuses_bad_inputs_and_leaves_nothing(tmp_path):
    a = run_experiment(small(tmp_path / "a", [0]))
    other = run_experiment(small(tmp_path / "o", [1], train={"rounds": 1, "batch_size": 256}))
    with pytest.raises(FedmarketError, match=r"differ in \['train'\]"):
        merge_runs([a, other], tmp_path / "m1")
    with pytest.raises(FedmarketError, match="seed 0 is in both"):
        merge_runs([a, a], tmp_path / "m2")
    b = run_experiment(small(tmp_path / "b", [1]))
    (b / "seeds" / "seed1.json").unlink()
    with pytest.raises(FedmarketError, match="seed1.json is missing"):
        merge_runs([a, b], tmp_path / "m3")
    with pytest.raises(FedmarketError, match="already exists"):
        merge_runs([a], a)
    assert not any((tmp_path / n).exists() for n in ("m1", "m2", "m3", "m1.partial", "m3.partial"))


def test_run_grid_drops_only_the_checkpoints_of_its_own_finished_jobs(tmp_path: Path) -> None:
    """Several grids may write into one --out at once; one that finishes must not delete the checkpoints a
    still-running (or killed, to be resumed) run folder needs."""
    from fedmarket.lab.grid import drop_checkpoints

    mine, other = tmp_path / "seed0" / "a-1", tmp_path / "seed0" / "b-2"
    for folder in (mine, other):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "seed0.ckpt").write_bytes(b"x")
    drop_checkpoints([mine])
    assert not (mine / "checkpoints").exists()
    assert (other / "checkpoints" / "seed0.ckpt").read_bytes() == b"x"


def test_run_grid_resume_continues_the_interrupted_folder_of_the_same_job(tmp_path: Path) -> None:
    """A grid killed mid-run (deadline, preemption) is re-run with --resume: each job continues its own
    interrupted folder from its last round checkpoint instead of starting over; a folder of another config
    (here: other learning rate) or a finished one is not taken."""
    import yaml

    out = tmp_path / "grid"
    base = small(out / "seed0", [0]).to_dict()
    base["train"]["threads"] = 1
    # the interruption: a 2-round run of the 3-round job, its results gone, its round-2 checkpoint kept
    cut = dict(base, train=dict(base["train"], rounds=2))
    folder = run_experiment(config_from_dict(cut))
    assert (folder / "checkpoints" / "seed0.ckpt").exists()
    for f in ("metrics.json", "seeds/seed0.json", "rounds.csv"):
        (folder / f).unlink(missing_ok=True)
    full = dict(base, train=dict(base["train"], rounds=3))
    (folder / "config.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    other = run_experiment(config_from_dict(dict(full, train=dict(full["train"], lr=0.5, rounds=1))))
    for f in ("metrics.json", "seeds/seed0.json"):  # unfinished, but another config: must not be resumed
        (other / f).unlink()
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in full.items() if k != "output_dir"}, sort_keys=False))

    from fedmarket.lab.grid import resumable

    job = {"config": str(config), "seed": 0, "set": {}, "tag": "job-seed0"}
    assert resumable(job, out, 1) == folder
    assert resumable(dict(job, set={"train.lr": 0.5}), out, 1) is None  # `other` has 1 round, not 3

    archive = tmp_path / "results"
    run = run_grid_cli(
        str(config), "--seeds", "0", "--jobs", "1", "--out", str(out), "--resume", "--archive", str(archive)
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"resuming job-seed0 from {folder}" in run.stdout
    rounds = {line.split(",")[1] for line in (folder / "rounds.csv").read_text().splitlines()[1:]}
    assert rounds == {"1", "2", "3"}  # rounds 1-2 from the checkpoint's history, round 3 trained now
    merged = json.loads((out / "merged" / "merge_test" / "metrics.json").read_text())
    assert merged["seeds"] == [0]
    # --archive: the finished job's seed record, the same as the run folder's
    import gzip

    archived = json.loads(gzip.decompress((archive / "merge_test" / "seed0.json.gz").read_bytes()))
    assert archived == json.loads((folder / "seeds" / "seed0.json").read_text())


def test_merge_ignores_how_a_run_displayed_itself(tmp_path: Path) -> None:
    """One seed run with progress bars, another without: the same computation, so they merge."""
    a = run_experiment(small(tmp_path / "a", [0]))
    b = run_experiment(small(tmp_path / "b", [1], progress=True))
    merged = merge_runs([a, b], tmp_path / "merged")
    assert json.loads((merged / "metrics.json").read_text())["seeds"] == [0, 1]


def test_run_grid_failed_merge_keeps_the_previous_merged_folder(tmp_path: Path) -> None:

    out = tmp_path / "grid"
    run_experiment(small(out / "seed0", [0]))
    other = run_experiment(small(out / "seed1", [1], train={"rounds": 1, "batch_size": 256}))
    (out / "merged" / "earlier").mkdir(parents=True)
    (out / "merged" / "earlier" / "report.md").write_text("kept")
    run = run_grid_cli("--out", str(out))
    assert run.returncode != 0
    assert "merge failed" in run.stderr and "differ in ['train']" in run.stderr
    assert (out / "merged" / "earlier" / "report.md").read_text() == "kept"
    assert sorted(p.name for p in (out / "merged").iterdir()) == ["earlier"]
    assert not any(p.name.startswith(".grid.merged") for p in tmp_path.iterdir())
    # the conflict resolved, the merge replaces the folder
    import shutil

    shutil.rmtree(other)
    run = run_grid_cli("--out", str(out), script=True)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (out / "merged").iterdir()) == ["merge_test"]


def run_grid_cli(*args: str, script: bool = False):
    """``fedmarket grid ARGS`` in a subprocess (``script=True``: through the ``scripts/run_grid.py`` entry point)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    entry = [str(root / "scripts" / "run_grid.py")] if script else ["-m", "fedmarket", "grid"]
    return subprocess.run(
        [sys.executable, *entry, *args], capture_output=True, text=True, timeout=600, cwd=root
    )


def mtl(tmp_path, method, federated_rounds=None, **train):
    options = {"federated_rounds": federated_rounds} if federated_rounds is not None else {}
    return config_from_dict(
        {
            "name": method,
            "dataset": {
                "name": "synthetic-mtl",
                "options": {"num_markets": 3, "users_per_market": 40, "items_per_market": 60},
                "use_cache": False,
            },
            "method": {"name": method, "options": options},
            "model": {"name": "mmoe", "embed_dim": 4, "hidden": [8], "tower_hidden": [4], "num_experts": 4},
            "train": {"batch_size": 256, **train},
            "eval": {"select_metric": "mean_auc"},
            "output_dir": str(tmp_path),
            "progress": False,
            "seeds": [0, 1],
        }
    )


def test_first_phase_run_is_the_run_without_its_second_phase(tmp_path):
    """FedAvg + fine-tune's first phase as a run folder equals FedAvg alone run to the same plateau: test
    metrics, rounds, uploads — the "without fine-tuning" row without a run of its own."""
    plateau = {"rounds": 10, "patience": 1, "min_delta": 0.5}
    phased = run_experiment(mtl(tmp_path / "p", "mtl_fedavg_ft", 8, **plateau))
    alone = run_experiment(mtl(tmp_path / "a", "mtl_fedavg", **plateau))
    out = first_phase_run(phased, tmp_path / "first")
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, alone))
    assert got["name"] == "mtl_fedavg_ft_phase1" and got["seeds"] == [0, 1]
    assert got["per_market"] == want["per_market"] and got["average_std"] == want["average_std"]
    assert got["selected_round"] == want["selected_round"]
    assert got["communication"] == want["communication"]
    assert {c["rounds_run"] for c in got["convergence"].values()} == {2}
    assert (out / "rounds.csv").read_text() == (alone / "rounds.csv").read_text()
    full = json.loads((phased / "metrics.json").read_text())
    assert full["per_market"] != got["per_market"]  # the phased run itself reports the fine-tuned model
    # merged seeds keep their phase tests
    merged = merge_runs([phased], tmp_path / "merged")
    again = first_phase_run(merged, tmp_path / "first2")
    assert json.loads((again / "metrics.json").read_text())["per_market"] == got["per_market"]
    # a seed from before phase tests were recorded: refused, or left out on request
    rec = json.loads((phased / "seeds" / "seed1.json").read_text())
    rec["phase_tests"] = []
    (phased / "seeds" / "seed1.json").write_text(json.dumps(rec))
    with pytest.raises(FedmarketError, match="seed1.json records no phase end"):
        first_phase_run(phased, tmp_path / "first3")
    some = first_phase_run(phased, tmp_path / "first3", skip_missing=True)
    assert json.loads((some / "metrics.json").read_text())["seeds"] == [0]
    from fedmarket.cli import main

    assert main(["first-phase", str(phased), "--out", str(tmp_path / "cli"), "--skip-missing"]) == 0
    assert (
        json.loads((tmp_path / "cli" / "metrics.json").read_text())["per_market"]
        == json.loads((some / "metrics.json").read_text())["per_market"]
    )


def test_first_phase_run_refuses_runs_without_a_phase_end(tmp_path):
    no_plateau = run_experiment(mtl(tmp_path / "n", "mtl_fedavg_ft", 2, rounds=3))
    with pytest.raises(FedmarketError, match="seed0.json records no phase end"):
        first_phase_run(no_plateau, tmp_path / "x")
    with pytest.raises(FedmarketError, match="already exists"):
        first_phase_run(no_plateau, no_plateau)
    with pytest.raises(FedmarketError, match="no seed of .* records a phase end"):
        first_phase_run(no_plateau, tmp_path / "x", skip_missing=True)
    (no_plateau / "seeds" / "seed0.json").unlink()
    with pytest.raises(FedmarketError, match="seed0.json is missing"):
        first_phase_run(no_plateau, tmp_path / "y")
    assert not any((tmp_path / n).exists() for n in ("x", "y", "x.partial", "y.partial"))


def test_archive_accumulates_seeds_and_restores_the_merged_run(tmp_path):
    """Seeds archived from separate folders (runs at different times or on different machines) restore into
    what merging them gives; re-archiving the same record is a no-op; a different record for an archived seed,
    or a changed config, is refused and nothing is written."""
    import gzip

    from fedmarket.lab.runs import archive_runs, restore_runs

    a = run_experiment(small(tmp_path / "a", [0]))
    b = run_experiment(small(tmp_path / "b", [1]))
    archive = tmp_path / "results"
    written = archive_runs([a], archive)
    assert sorted(p.name for p in written) == ["config.yaml", "seed0.json.gz"]
    # a root finds its finished run folders; the already archived seed is skipped
    written = archive_runs([tmp_path / "b", a], archive)
    assert [p.name for p in written] == ["seed1.json.gz"]
    assert archive_runs([a, b], archive) == []
    from fedmarket.cli import main as cli

    assert cli(["archive", str(a), "--to", str(archive)]) == 0  # nothing new: still fine
    rec = json.loads(gzip.decompress((archive / "merge_test" / "seed1.json.gz").read_bytes()))
    assert rec == json.loads((b / "seeds" / "seed1.json").read_text())

    assert cli(["restore", str(archive), "--out", str(tmp_path / "cli"), "--name", "merge_test"]) == 0
    from fedmarket.cli import build_parser

    args = build_parser().parse_args(["restore", "A", "--out", "O", "--name", "a", "b", "--name", "c"])
    assert args.name == ["a", "b", "c"]  # a repeated --name adds to the list
    assert (tmp_path / "cli" / "merge_test" / "report.md").is_file()
    (restored,) = restore_runs(archive, tmp_path / "restored")
    merged = merge_runs([a, b], tmp_path / "merged")
    m1 = json.loads((merged / "metrics.json").read_text())
    m2 = json.loads((restored / "metrics.json").read_text())
    assert m2["seeds"] == [0, 1]
    for key in ("per_market", "per_market_std", "average", "average_std", "communication", "selected_round"):
        assert m2[key] == m1[key], key
    assert (restored / "rounds.csv").read_text() == (merged / "rounds.csv").read_text()
    with pytest.raises(FedmarketError, match="already exists"):
        restore_runs(archive, tmp_path / "restored")
    with pytest.raises(FedmarketError, match=r"\['nope'\] not archived"):
        restore_runs(archive, tmp_path / "r2", names=["nope"])
    # an unreadable record anywhere: nothing restored at all
    bad = archive / "zz_broken"
    bad.mkdir()
    (bad / "config.yaml").write_text((archive / "merge_test" / "config.yaml").read_text())
    (bad / "seed0.json.gz").write_bytes(b"not gzip")
    with pytest.raises(FedmarketError, match="unreadable seed record in .*zz_broken"):
        restore_runs(archive, tmp_path / "r3")
    assert not (tmp_path / "r3" / "merge_test").exists()
    import shutil

    shutil.rmtree(bad)

    # same name, different experiment: refused, naming the difference
    other = run_experiment(small(tmp_path / "o", [2], train={"rounds": 1, "batch_size": 256}))
    with pytest.raises(FedmarketError, match=r"differs in \['train'\]"):
        archive_runs([other], archive)
    # same seed, different record (e.g. a rerun on other data): refused, the archive unchanged
    seed1 = b / "seeds" / "seed1.json"
    changed = json.loads(seed1.read_text())
    changed["test"][next(iter(changed["test"]))]["hr@5"] = 0.123
    seed1.write_text(json.dumps(changed))
    c = run_experiment(small(tmp_path / "c", [2]))
    before = sorted(p.name for p in (archive / "merge_test").iterdir())
    with pytest.raises(FedmarketError, match="seed 1 of 'merge_test' is archived already"):
        archive_runs([c, b], archive)
    assert sorted(p.name for p in (archive / "merge_test").iterdir()) == before  # seed 2 not written either
    with pytest.raises(FedmarketError, match="does not exist"):
        archive_runs([tmp_path / "missing"], archive)
