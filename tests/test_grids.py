"""Every grid under scripts/grids/ names configs that exist and overrides that validate, so a grid started on a
lent many-core machine cannot fail on its first job's config."""

from pathlib import Path

import pytest

from fedmarket.config import load_config
from fedmarket.lab import grid as lab_grid

ROOT = Path(__file__).resolve().parents[1]
GRIDS = sorted((ROOT / "scripts" / "grids").glob("*.yaml"))


@pytest.mark.parametrize("grid", GRIDS, ids=[g.stem for g in GRIDS])
def test_grid_jobs_load_and_validate(grid: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    jobs = lab_grid.load_jobs([], [0], jobs_file=str(grid))
    assert jobs
    tags = [job["tag"] for job in jobs]
    assert len(set(tags)) == len(tags), f"{grid.name}: two jobs share a tag (their logs would collide)"
    for job in jobs:
        cfg = load_config(job["config"], lab_grid.job_overrides(job, 1))
        assert cfg.seeds == [job["seed"]]


def test_s2ce_sweep_changes_only_the_loss_settings() -> None:
    """The sweep compares losses at matched compute: every job runs the same 40 rounds, patience off, and no
    two jobs share a setting."""
    grid = ROOT / "scripts" / "grids" / "fecosr_s2ce_sweep.yaml"
    jobs = lab_grid.load_jobs([], [0], jobs_file=str(grid))
    cfgs = [load_config(ROOT / job["config"], lab_grid.job_overrides(job, 1)).to_dict() for job in jobs]
    assert {(c["train"]["rounds"], c["train"]["patience"]) for c in cfgs} == {(40, 0)}
    keys = ("tau", "top_k", "lam", "whiten")
    settings = {tuple(c["method"]["options"].get(k) for k in keys) for c in cfgs[1:]}
    assert len(settings) == len(cfgs) - 1 and (0.1, 50, 0.5, None) in settings
    assert cfgs[0]["method"]["options"]["loss"] == "ce"


def test_skip_archived_leaves_out_only_the_seeds_archived_under_the_same_config(
    tmp_path, monkeypatch
) -> None:
    """``--skip-archived``: a seed archived under an identical config is not run again; another seed, or the
    same name with a changed setting, is."""
    import gzip

    import yaml

    from fedmarket.lab.runs import ARCHIVE_CONFIG, same_run_config

    monkeypatch.chdir(ROOT)
    config = "configs/movielens-age_fecosr_m05_fixed-pt.yaml"
    jobs = lab_grid.load_jobs([config], [0, 1])
    cfg = load_config(config, lab_grid.job_overrides(jobs[0], 1))
    target = tmp_path / cfg.name
    target.mkdir()
    (target / ARCHIVE_CONFIG).write_text(yaml.safe_dump(same_run_config(cfg), sort_keys=False))
    (target / "seed0.json.gz").write_bytes(gzip.compress(b"{}"))
    assert [lab_grid.archived(job, tmp_path, 1) for job in jobs] == [True, False]
    changed = {**jobs[0], "set": {"train.lr": 0.01}}  # same name, another experiment: must run
    assert not lab_grid.archived(changed, tmp_path, 1)
    assert not lab_grid.archived(jobs[0], tmp_path / "elsewhere", 1)
