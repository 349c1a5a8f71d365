"""The job pool: a grid of experiments (configs × seeds, optional overrides) run as parallel single-seed
``fedmarket run`` processes, then each config's seeds merged into one run folder (`fedmarket.lab.runs.merge_grid`).
Made for many-core machines: each process uses ``threads`` threads (default one), ``jobs`` of them run at once.
``fedmarket grid`` is a thin layer over `run_grid`.

Per-seed run folders land in ``OUT/seed<N>/``; merged ones in ``OUT/merged/<name>``; each job's log in
``OUT/logs``. A job that fails or passes ``timeout`` seconds is reported with its log and left out of the merge.
FedMM runs get their analysis-only code-alignment diagnostic (``alignment.json``) before the merge. With
``drop_checkpoints`` the round checkpoints of the jobs that finished are deleted afterwards (they can be large);
those of other run folders under ``OUT`` are kept. ``resume`` continues each job's interrupted run folder under
``OUT`` (same config and overrides, a round checkpoint, the seed unfinished: a grid killed by a deadline, a
preemption or a reboot) from its last round instead of starting it over. With ``archive`` each finished job's
seed record is archived there at once (`fedmarket.lab.runs.archive_runs`); with ``skip_archived`` too a job
whose seed is archived there under the same config is left out, so one grid of remaining work can be restarted
with ``resume`` and ``skip_archived`` until every job is in.

A jobs file is a YAML list, each entry ``{config: PATH, seeds: [..], set: {key: value, ...}}`` (a sweep of one
config: give each entry its own ``set: {name: ...}``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedmarket.errors import FedmarketError


@dataclass
class GridResult:
    """What a grid did: jobs planned and finished, the tags of those that failed or never started, the run
    folders of the jobs that finished, the merged run folders (one per config name) and the wall time."""

    total: int
    done: int
    failed: list[str]
    finished: list[Path]
    merged: list[Path] = field(default_factory=list)
    wall: float = 0.0


def load_jobs(
    configs: Sequence[str], seeds: Sequence[int], jobs_file: str | Path | None = None
) -> list[dict]:
    """One job per config and seed (``{config, seed, set, tag}``): each of ``configs`` with every seed in
    ``seeds``, then each entry of ``jobs_file`` with its own ``seeds`` (else ``seeds``) and ``set``. A missing
    config or a malformed jobs file is an error before anything runs."""
    jobs = []
    specs = [{"config": c, "seeds": seeds, "set": {}} for c in configs]
    if jobs_file:
        loaded = yaml.safe_load(Path(jobs_file).read_text()) or []
        if not isinstance(loaded, list):
            raise FedmarketError(f"{jobs_file}: expected a YAML list of jobs")
        for i, spec in enumerate(loaded):
            if not isinstance(spec, dict) or "config" not in spec:
                raise FedmarketError(f"{jobs_file}: job {i} needs a 'config' key, got {spec!r}")
            specs.append(
                {
                    "config": spec["config"],
                    "seeds": spec.get("seeds", seeds),
                    "set": spec.get("set") or {},
                }
            )
    for spec in specs:
        if not Path(spec["config"]).exists():
            raise FedmarketError(f"config not found: {spec['config']}")
        for seed in spec["seeds"]:
            sets = dict(spec["set"])
            tag = sets.get("name") or Path(spec["config"]).stem
            jobs.append(
                {"config": spec["config"], "seed": int(seed), "set": sets, "tag": f"{tag}-seed{seed}"}
            )
    return jobs


def job_overrides(job: dict, threads: int) -> dict:
    """The config overrides a job runs with: its seed, its threads and its ``set``."""
    return {"seeds": [job["seed"]], "train.threads": threads, **job["set"]}


def resumable(job: dict, out: Path, threads: int) -> Path | None:
    """The newest interrupted run folder of this very job under ``OUT/seed<N>/``: its saved config equals the
    job's (`fedmarket.lab.runs.same_run_config`), it has a round checkpoint and no finished seed; None if there
    is none."""
    from fedmarket.config import load_config, load_run_config
    from fedmarket.lab.runs import same_run_config

    seed = job["seed"]
    want = same_run_config(load_config(job["config"], job_overrides(job, threads)))
    for folder in sorted((out / f"seed{seed}").glob("*"), key=lambda f: f.stat().st_mtime, reverse=True):
        if (folder / "seeds" / f"seed{seed}.json").exists() or not (
            folder / "checkpoints" / f"seed{seed}.ckpt"
        ).exists():
            continue
        try:
            if same_run_config(load_run_config(folder)) == want:
                return folder
        except Exception:  # not a run folder of this project's configs: not ours to resume
            continue
    return None


def archived(job: dict, archive: Path, threads: int) -> bool:
    """The job's seed record is in ``archive`` (`fedmarket archive`) under the very same config (the archived
    ``config.yaml`` equals the job's as `fedmarket.lab.runs.same_run_config` sees it): the job need not run
    again."""
    from fedmarket.config import config_from_dict, load_config
    from fedmarket.lab.runs import ARCHIVE_CONFIG, config_diff, same_run_config

    cfg = load_config(job["config"], job_overrides(job, threads))
    target = archive / cfg.name
    if not (target / f"seed{job['seed']}.json.gz").is_file() or not (target / ARCHIVE_CONFIG).is_file():
        return False
    old = same_run_config(config_from_dict(yaml.safe_load((target / ARCHIVE_CONFIG).read_text())))
    return not config_diff(old, same_run_config(cfg))


def command(job: dict, out: Path, threads: int, resume: bool = False) -> list[str]:
    """The ``fedmarket run`` command line of a job (``--resume FOLDER`` when `resumable` finds its folder)."""
    folder = resumable(job, out, threads) if resume else None
    if folder is not None:
        print(f"resuming {job['tag']} from {folder}", flush=True)
        return [sys.executable, "-m", "fedmarket", "run", "--resume", str(folder), "--no-progress"]
    cmd = [
        sys.executable,
        "-m",
        "fedmarket",
        "run",
        job["config"],
        "--no-progress",
        "--output-dir",
        str(out / f"seed{job['seed']}"),
        "--set",
        f"seeds=[{job['seed']}]",
        "--set",
        f"train.threads={threads}",
    ]
    for key, value in job["set"].items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return cmd


def alignment_command(folder: str) -> list[str]:
    """FedMM's analysis-only code-alignment diagnostic of a finished run folder, as its own process."""
    code = (
        "import sys; from fedmarket.methods.fedmm import alignment_from_run; alignment_from_run(sys.argv[1])"
    )
    return [sys.executable, "-c", code, folder]


def drop_checkpoints(folders: list[Path]) -> None:
    """Delete the round checkpoints of these finished run folders only: other grids writing into the same
    ``--out`` (or a killed job that may be resumed) keep theirs."""
    for folder in folders:
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)


def run_jobs(
    jobs: list[dict],
    out: Path,
    parallel: int,
    threads: int = 1,
    timeout: float | None = None,
    archive: str | Path | None = None,
    resume: bool = False,
    deadline: float | None = None,
    reserve: float = 0.0,
) -> GridResult:
    """Run ``jobs`` as ``fedmarket run`` processes, ``parallel`` at a time (each with ``threads`` threads),
    logging each to ``out/logs/<tag>.log``; no merge. ``deadline``: seconds for the whole pool, running jobs
    are killed at it and no job starts later than ``deadline - reserve``."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending = [("run", job) for job in jobs]
    total = len(pending)
    running: list[tuple[str, dict, subprocess.Popen, float, object]] = []
    started, done, failed = time.perf_counter(), 0, []
    finished: list[Path] = []  # run folders of the jobs that finished here
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    while pending or running:
        now = time.perf_counter() - started
        if deadline and pending and now > deadline - reserve:
            skipped = [job["tag"] for kind, job in pending if kind == "run"]
            if skipped:
                print(f"deadline: {len(skipped)} job(s) not started: {skipped}", flush=True)
            failed += skipped
            pending = [(kind, job) for kind, job in pending if kind != "run"]  # diagnostics still run
        while pending and len(running) < parallel:
            kind, job = pending.pop(0)
            cmd = command(job, out, threads, resume) if kind == "run" else alignment_command(job["folder"])
            log = (logs / f"{job['tag']}{'' if kind == 'run' else '-alignment'}.log").open("w")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((kind, job, proc, time.perf_counter(), log))
        time.sleep(1)
        for item in list(running):
            kind, job, proc, t0, log = item
            elapsed = time.perf_counter() - t0
            if proc.poll() is None:
                late = deadline and time.perf_counter() - started > deadline
                if (timeout and elapsed > timeout) or late:
                    proc.kill()
                    proc.wait()
                else:
                    continue
            running.remove(item)
            log.close()
            if kind == "alignment":
                continue
            text = Path(log.name).read_text()
            folders = [
                ln.split("run folder:", 1)[1].strip() for ln in text.splitlines() if "run folder:" in ln
            ]
            if proc.returncode or not folders:
                failed.append(job["tag"])
                why = "timeout" if timeout and elapsed > timeout else f"exit {proc.returncode}"
                print(
                    f"FAILED {job['tag']} ({why}, {elapsed:.0f} s; log {log.name})\n{text[-1500:]}",
                    flush=True,
                )
                continue
            done += 1
            finished.append(Path(folders[-1]))
            print(f"[{done}/{total}] {job['tag']} {elapsed:.0f} s -> {folders[-1]}", flush=True)
            if archive:
                from fedmarket.lab.runs import archive_runs

                try:
                    archive_runs([folders[-1]], archive)
                except FedmarketError as exc:  # the run stays; only its archiving is refused
                    print(f"NOT ARCHIVED {job['tag']}: {exc}", flush=True)
            if (Path(folders[-1]) / "checkpoints").exists():
                method = yaml.safe_load((Path(folders[-1]) / "config.yaml").read_text())["method"]["name"]
                if method == "fedmm":
                    pending.insert(0, ("alignment", {"folder": folders[-1], "tag": job["tag"]}))
    return GridResult(total, done, failed, finished, wall=time.perf_counter() - started)


def merge_out(out: Path) -> list[Path]:
    """Merge every finished run folder under ``out`` by config name into ``out/merged/<name>``. The previous
    ``out/merged`` steps aside (outside ``out``, where the merge does not look) and comes back if this merge
    fails (an error that says so)."""
    from fedmarket.lab.runs import merge_grid

    merged = out / "merged"
    previous = out.parent / f".{out.name}.merged-previous"
    shutil.rmtree(previous, ignore_errors=True)
    if merged.exists():
        merged.rename(previous)
    try:
        folders = merge_grid(out, merged)
    except Exception as exc:
        shutil.rmtree(merged, ignore_errors=True)
        if previous.exists():
            previous.rename(merged)
        raise FedmarketError(f"merge failed; {merged} left as it was before: {exc}") from exc
    shutil.rmtree(previous, ignore_errors=True)
    return folders


def run_grid(
    configs: Sequence[str] = (),
    seeds: Sequence[int] = (0,),
    jobs_file: str | Path | None = None,
    out: str | Path = "runs/grid",
    parallel: int | None = None,
    threads: int = 1,
    timeout: float | None = None,
    drop: bool = False,
    archive: str | Path | None = None,
    resume: bool = False,
    skip_archived: bool = False,
    deadline: float | None = None,
    reserve: float = 0.0,
) -> GridResult:
    """Every config × seed (and every job of ``jobs_file``) as its own process (`run_jobs`), then the merge of
    everything finished under ``out`` (`merge_out`). ``parallel``: processes at once (default: one fewer than
    the cores); ``drop``: delete the round checkpoints of the jobs that finished (`drop_checkpoints`)."""
    out = Path(out)
    if parallel is None:
        parallel = max(1, (os.cpu_count() or 2) - 1)
    jobs = load_jobs(configs, seeds, jobs_file)
    if skip_archived:
        if not archive:
            raise FedmarketError(
                "--skip-archived needs --archive DIR (where the finished seeds are archived)"
            )
        done_before = [job["tag"] for job in jobs if archived(job, Path(archive), threads)]
        if done_before:
            print(f"archived already, not run: {done_before}", flush=True)
        jobs = [job for job in jobs if job["tag"] not in done_before]
    result = run_jobs(jobs, out, parallel, threads, timeout, archive, resume, deadline, reserve)
    if drop:
        drop_checkpoints(result.finished)
    result.merged = merge_out(out)
    return result
