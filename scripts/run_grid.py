"""Run a grid of experiments (configs × seeds, optional overrides) as parallel single-seed processes, then
merge each config's seeds into one run folder (``fedmarket merge --grid``). Made for many-core machines:
each process uses one thread, ``--jobs`` of them run at once.

    # every config × seeds 0..2, 14 processes at a time, into runs/grid (per seed) and runs/grid/merged
    python scripts/run_grid.py configs/xmrec_fedmm.yaml configs/xmrec_fedavg.yaml --seeds 0 1 2 --jobs 14 \
        --out runs/grid
    # jobs from a YAML list, each {config: PATH, seeds: [..], set: {key: value, ...}} (a sweep: set `name`)
    python scripts/run_grid.py --jobs-file sweep.yaml --jobs 14 --out runs/sweep

Per-seed run folders land in ``OUT/seed<N>/``; merged ones in ``OUT/merged/<name>``. A job that fails or
passes ``--timeout`` seconds is reported with its log (``OUT/logs``) and left out of the merge. FedMM runs
get their analysis-only code-alignment diagnostic (``alignment.json``) before the merge; with
``--drop-checkpoints`` the round checkpoints of the jobs that finished are deleted afterwards (they can be
large); those of other run folders under ``--out`` are kept. ``--resume`` continues each job's interrupted run
folder under ``--out`` (same config and overrides, a round checkpoint, the seed unfinished: a grid killed by a
deadline, a preemption or a reboot) from its last round instead of starting it over:

    python scripts/run_grid.py configs/movielens-age_fecosr.yaml --seeds 0 1 2 --jobs 2 --out runs/mlage --resume

With ``--archive DIR --skip-archived`` a job whose seed is archived in DIR under the same config is left out, so
one grid of remaining work can be restarted with ``--resume --skip-archived`` until every job is in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml


def load_jobs(args: argparse.Namespace) -> list[dict]:
    jobs = []
    specs = [{"config": c, "seeds": args.seeds, "set": {}} for c in args.configs]
    if args.jobs_file:
        loaded = yaml.safe_load(Path(args.jobs_file).read_text()) or []
        if not isinstance(loaded, list):
            raise SystemExit(f"{args.jobs_file}: expected a YAML list of jobs")
        for i, spec in enumerate(loaded):
            if not isinstance(spec, dict) or "config" not in spec:
                raise SystemExit(f"{args.jobs_file}: job {i} needs a 'config' key, got {spec!r}")
            specs.append(
                {
                    "config": spec["config"],
                    "seeds": spec.get("seeds", args.seeds),
                    "set": spec.get("set") or {},
                }
            )
    for spec in specs:
        if not Path(spec["config"]).exists():
            raise SystemExit(f"config not found: {spec['config']}")
        for seed in spec["seeds"]:
            sets = dict(spec["set"])
            tag = sets.get("name") or Path(spec["config"]).stem
            jobs.append(
                {"config": spec["config"], "seed": int(seed), "set": sets, "tag": f"{tag}-seed{seed}"}
            )
    return jobs


def job_overrides(job: dict, threads: int) -> dict:
    return {"seeds": [job["seed"]], "train.threads": threads, **job["set"]}


def resumable(job: dict, out: Path, threads: int) -> Path | None:
    """The newest interrupted run folder of this very job under ``OUT/seed<N>/``: its saved config equals the
    job's (``fedmarket.api.same_run_config``), it has a round checkpoint and no finished seed; None if there is none."""
    from fedmarket.api import load_run_config
    from fedmarket.config import load_config
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
    ``config.yaml`` equals the job's as `fedmarket.api.same_run_config` sees it): the job need not run again."""
    from fedmarket.config import config_from_dict, load_config
    from fedmarket.lab.runs import ARCHIVE_CONFIG, config_diff, same_run_config

    cfg = load_config(job["config"], job_overrides(job, threads))
    target = archive / cfg.name
    if not (target / f"seed{job['seed']}.json.gz").is_file() or not (target / ARCHIVE_CONFIG).is_file():
        return False
    old = same_run_config(config_from_dict(yaml.safe_load((target / ARCHIVE_CONFIG).read_text())))
    return not config_diff(old, same_run_config(cfg))


def command(job: dict, out: Path, threads: int, resume: bool = False) -> list[str]:
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
    code = (
        "import sys; from fedmarket.methods.fedmm import alignment_from_run; alignment_from_run(sys.argv[1])"
    )
    return [sys.executable, "-c", code, folder]


def drop_checkpoints(folders: list[Path]) -> None:
    """Delete the round checkpoints of these finished run folders only: other grids writing into the same
    ``--out`` (or a killed job that may be resumed) keep theirs."""
    for folder in folders:
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*")
    ap.add_argument("--jobs-file")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per job")
    ap.add_argument("--out", default="runs/grid")
    ap.add_argument("--drop-checkpoints", action="store_true")
    ap.add_argument(
        "--archive",
        metavar="DIR",
        help="archive each job's seed record there as soon as it finishes (`fedmarket archive`: small, "
        "committable; seeds from many grids accumulate, `fedmarket restore DIR` merges them)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue each job's interrupted run folder under --out from its last checkpoint",
    )
    ap.add_argument(
        "--skip-archived",
        action="store_true",
        help="with --archive: leave out the jobs whose seed record is archived there under the same config "
        "(a standing grid of remaining work, restarted until every job is archived, runs each job once)",
    )
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds for the whole grid: running jobs are killed at it (the merge still runs)",
    )
    ap.add_argument("--reserve", type=float, default=0.0, help="no job starts later than deadline - reserve")
    args = ap.parse_args()
    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    jobs = load_jobs(args)
    if args.skip_archived:
        if not args.archive:
            raise SystemExit("--skip-archived needs --archive DIR (where the finished seeds are archived)")
        done_before = [job["tag"] for job in jobs if archived(job, Path(args.archive), args.threads)]
        if done_before:
            print(f"archived already, not run: {done_before}", flush=True)
        jobs = [job for job in jobs if job["tag"] not in done_before]
    pending = [("run", job) for job in jobs]
    total = len(pending)
    running: list[tuple[str, dict, subprocess.Popen, float, object]] = []
    started, done, failed = time.perf_counter(), 0, []
    finished: list[Path] = []  # run folders of the jobs that finished here
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    while pending or running:
        now = time.perf_counter() - started
        if args.deadline and pending and now > args.deadline - args.reserve:
            skipped = [job["tag"] for kind, job in pending if kind == "run"]
            if skipped:
                print(f"deadline: {len(skipped)} job(s) not started: {skipped}", flush=True)
            failed += skipped
            pending = [(kind, job) for kind, job in pending if kind != "run"]  # diagnostics still run
        while pending and len(running) < args.jobs:
            kind, job = pending.pop(0)
            cmd = (
                command(job, out, args.threads, args.resume)
                if kind == "run"
                else alignment_command(job["folder"])
            )
            log = (logs / f"{job['tag']}{'' if kind == 'run' else '-alignment'}.log").open("w")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((kind, job, proc, time.perf_counter(), log))
        time.sleep(1)
        for item in list(running):
            kind, job, proc, t0, log = item
            elapsed = time.perf_counter() - t0
            if proc.poll() is None:
                late = args.deadline and time.perf_counter() - started > args.deadline
                if (args.timeout and elapsed > args.timeout) or late:
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
                why = "timeout" if args.timeout and elapsed > args.timeout else f"exit {proc.returncode}"
                print(
                    f"FAILED {job['tag']} ({why}, {elapsed:.0f} s; log {log.name})\n{text[-1500:]}",
                    flush=True,
                )
                continue
            done += 1
            finished.append(Path(folders[-1]))
            print(f"[{done}/{total}] {job['tag']} {elapsed:.0f} s -> {folders[-1]}", flush=True)
            if args.archive:
                from fedmarket.errors import FedmarketError
                from fedmarket.lab.runs import archive_runs

                try:
                    archive_runs([folders[-1]], args.archive)
                except FedmarketError as exc:  # the run stays; only its archiving is refused
                    print(f"NOT ARCHIVED {job['tag']}: {exc}", flush=True)
            if (Path(folders[-1]) / "checkpoints").exists():
                method = yaml.safe_load((Path(folders[-1]) / "config.yaml").read_text())["method"]["name"]
                if method == "fedmm":
                    pending.insert(0, ("alignment", {"folder": folders[-1], "tag": job["tag"]}))
    wall = time.perf_counter() - started
    if args.drop_checkpoints:
        drop_checkpoints(finished)
    from fedmarket.lab.runs import merge_grid

    merged = out / "merged"
    # the previous merge steps aside (outside OUT, where the merge does not look) and comes back if this one fails
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
        raise SystemExit(f"merge failed; {merged} left as it was before: {exc}") from exc
    shutil.rmtree(previous, ignore_errors=True)
    print(
        f"{done}/{total} jobs finished in {wall:.0f} s wall ({args.jobs} at a time); failed: {failed or 'none'}"
    )
    for folder in folders:
        print("merged", folder)


if __name__ == "__main__":
    main()
