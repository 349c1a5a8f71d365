"""``fedmarket`` command line: a thin layer over `fedmarket.api`.

fedmarket run CONFIG.yaml [--seeds N] [--rounds R] [--resume RUN_DIR]
fedmarket compare CONFIG.yaml... [--out DIR] [--seeds N]
fedmarket data info DATASET [--data-dir DIR]
fedmarket report RUN_DIR... [--out DIR]
fedmarket grid CONFIG... [--seeds S...] [--jobs N] [--out DIR] [--jobs-file JOBS.yaml] [--resume] [--archive DIR]
fedmarket merge RUN_DIR... --out DIR | fedmarket merge --grid ROOT --out DIR
fedmarket first-phase RUN_DIR --out DIR [--skip-missing]
fedmarket archive RUN_DIR|ROOT... --to ARCHIVE | fedmarket restore ARCHIVE --out DIR [--name NAME...]
fedmarket status RUN_DIR|ROOT... [--stale-after MIN]
fedmarket methods
fedmarket demo
fedmarket flower simulate|deploy CONFIG.yaml [--tls] [--resume RUN_DIR]   (also: fedmarket deploy CONFIG.yaml)
fedmarket export RUN_DIR|COMPARISON... --out DIR [--market M] [--seed S]
fedmarket recommend EXPORT_DIR --users users.csv [--k 10] [--exclude-history] [--out recs.csv|.parquet]
fedmarket serve EXPORT_DIR [--host 127.0.0.1] [--port 8000]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fedmarket import __version__
from fedmarket.environment import apply_quiet_env  # noqa: E402
from fedmarket.errors import FedmarketError

apply_quiet_env()

DEMO_CONFIGS = [
    "xmrec_local.yaml",
    "xmrec_fedavg.yaml",
    "xmrec_fedprox.yaml",
    "xmrec_fedper.yaml",
    "xmrec_centralized.yaml",
    "xmrec_fedmm.yaml",
]


MTL_METRICS = ("ctr_auc", "ctcvr_auc", "ctr_logloss", "ctcvr_logloss")
SEQ_METRICS = ("full_ndcg@10", "ndcg@10", "full_hr@10", "hr@10", "full_mrr@10", "mrr@10")


def _overrides(args: argparse.Namespace) -> dict:
    out = {}
    if getattr(args, "seeds", None):
        out["seeds"] = list(range(args.seeds))
    if getattr(args, "rounds", None):
        out["train.rounds"] = args.rounds
    if getattr(args, "output_dir", None):
        out["output_dir"] = args.output_dir
    if getattr(args, "data_dir", None):
        out["dataset.data_dir"] = args.data_dir
    if getattr(args, "no_progress", False):
        out["progress"] = False
    for item in getattr(args, "set", None) or []:
        if "=" not in item:
            raise FedmarketError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        out[key] = _parse_value(raw)
    return out


def _parse_value(raw: str):
    """A ``--set`` value as YAML, except that a number YAML 1.1 reads as a string (``1e-3``) is a number."""
    import re

    import yaml

    value = yaml.safe_load(raw)
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value.strip()):
        return float(value)
    return value


def cmd_run(args: argparse.Namespace) -> int:
    from fedmarket.api import run_experiment
    from fedmarket.config import load_config, load_run_config

    if args.resume:
        changes = sorted(k for k in _overrides(args) if k != "progress")
        if changes:
            raise FedmarketError(
                f"--resume continues {args.resume} with its saved config.yaml; {changes} cannot change it "
                "(start a new run to change the config)"
            )
        cfg = load_run_config(args.resume)
        print(f"resuming {args.resume} (its saved config.yaml is used)")
        run_dir = run_experiment(
            cfg, run_dir=args.resume, resume=True, checkpoint_fallback=args.previous_checkpoint
        )
    else:
        cfg = load_config(args.config, _overrides(args))
        run_dir = run_experiment(cfg)
    _print_run(run_dir)
    return 0


def _print_run(run_dir: Path) -> None:
    import json

    from fedmarket.report import comparison_table
    from fedmarket.status import HEADLINE

    print(f"\nrun folder: {run_dir}")
    average = json.loads((Path(run_dir) / "metrics.json").read_text()).get("average", {})
    shown = [m for m in HEADLINE if m in average][:2] or ["auc"]
    for metric in shown:
        print(f"{metric} (test):")
        print(comparison_table([run_dir], metric=metric, formatted=True).to_string())


def run_comparison(config_paths: list[str], out: str | None, overrides: dict) -> Path:
    from fedmarket.api import run_experiment
    from fedmarket.config import load_config
    from fedmarket.report import communication_table, comparison_table, write_report

    configs = [load_config(p, overrides) for p in config_paths]  # validate all before running any
    run_dirs = []
    for path, cfg in zip(config_paths, configs, strict=True):
        print(f"== {path}: {cfg.method.name} on {cfg.dataset.name}, {len(cfg.seeds)} seed(s)", flush=True)
        run_dirs.append(run_experiment(cfg))
    out_dir = (
        Path(out)
        if out
        else Path(configs[0].output_dir) / f"comparison-{run_dirs[-1].name.split('-', 1)[-1]}"
    )
    from fedmarket.methods import get_method

    tasks = {get_method(cfg.method.name).task for cfg in configs} - {"floor"}  # floors sit in every table
    multitask, sequential = tasks == {"mtl"}, tasks == {"seq"}
    if multitask:  # CTR + CTCVR over held-out impressions (fedmarket.methods.mtl_trainer)
        report = write_report(run_dirs, out_dir, metrics=MTL_METRICS)
    elif sequential:  # next-item ranking (fedmarket.methods.seq_trainer)
        report = write_report(run_dirs, out_dir, metrics=SEQ_METRICS, title="fedmarket sequential comparison")
    else:
        report = write_report(run_dirs, out_dir)
    shown = MTL_METRICS[:2] if multitask else SEQ_METRICS[:2] if sequential else ("auc", "logloss")
    for metric in shown:
        where = (
            "held-out impressions" if multitask else "full catalog" if "full" in metric else "1+99 candidates"
        )
        print(f"\n{metric} (test, {where}; mean ± std over seeds)")
        print(comparison_table(run_dirs, metric=metric, formatted=True).to_string())
    comm = communication_table(run_dirs)
    print("\nKB uploaded per market per round (download is the same size for the FedAvg family;")
    print("a not-private pooled run ships its raw train interactions once)")
    print(
        comm.pivot_table(index="run", columns="market", values="up MB/round", sort=False)
        .mul(1000)
        .round(1)
        .to_string()
    )
    print(f"\nreport: {report}")
    return report


def cmd_compare(args: argparse.Namespace) -> int:
    run_comparison(args.configs, args.out, _overrides(args))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    config_dir = Path(args.config_dir)
    paths = [str(config_dir / name) for name in DEMO_CONFIGS]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FedmarketError(
            f"demo configs not found: {missing} (run from the project root or pass --config-dir)"
        )
    print(
        "demo: a short fixed budget (10 CTR rounds, one seed) to show the workflow; it is not a verdict. "
        "Comparisons train every row to its validation plateau over 3 seeds: see docs/protocol.md and "
        "scripts/grids/xmrec_protocol2.yaml.",
        flush=True,
    )
    overrides = _overrides(args)
    if not args.no_tracking and "tracking" not in overrides:
        from fedmarket.errors import ConfigError
        from fedmarket.tracking import require_packages

        uri = str(overrides.get("tracking_uri", "mlruns"))
        try:
            require_packages(uri)
            overrides["tracking"] = "mlflow"
            print(
                f"demo: every run is also recorded in the MLflow store {uri!r} (--no-tracking: off)",
                flush=True,
            )
        except ConfigError as exc:
            print(f"demo: not tracked in MLflow ({exc})", flush=True)
    report = run_comparison(paths, args.out, overrides)
    print(
        f"next: fedmarket export {report.parent} --market ca --out exports  (the winner in ca), then "
        "fedmarket serve exports/ca (docs/serving.md)"
    )
    return 0


def cmd_data_info(args: argparse.Namespace) -> int:
    from fedmarket.data import dataset_info

    options = {}
    for item in args.option or []:
        key, _, value = item.partition("=")
        options[key] = value
    frame = dataset_info(args.dataset, data_dir=args.data_dir, **options)
    print(frame.to_string(index=False))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedmarket.methods import METHODS, get_method
    from fedmarket.report import load_run, write_report

    out = Path(args.out) if args.out else Path(args.run_dirs[0]).parent / "comparison"
    runs = [Path(p) for p in args.run_dirs]
    get_method("local")  # registers the built-in methods
    kinds = [METHODS.get(str(load_run(p).get("method"))) for p in runs]
    tasks = {kind.task if kind is not None else None for kind in kinds} - {
        "floor"
    }  # floors sit in every table
    multitask, sequential = tasks == {"mtl"}, tasks == {"seq"}
    if multitask:
        print(write_report(runs, out, metrics=MTL_METRICS))
    elif sequential:
        print(write_report(runs, out, metrics=SEQ_METRICS, title="fedmarket sequential comparison"))
    else:
        print(write_report(runs, out))
    return 0


def cmd_onboard(args: argparse.Namespace) -> int:
    from fedmarket.config import load_config
    from fedmarket.onboard import FRACTIONS, Plan, run_plan, write_report

    if args.report_only:
        print(write_report(Path(args.out)))
        return 0
    overrides = {k: v for k, v in _overrides(args).items() if k not in ("seeds", "train.rounds")}
    cfg = load_config(args.config, overrides)
    plan = Plan(
        cfg=cfg,
        newcomers=list(args.market),
        fractions=[float(k) for k in (args.fractions or FRACTIONS)],
        seeds=list(args.seed),
        rounds=args.rounds,
        join_round=args.join_round,
        out=Path(args.out),
        alone_rounds=args.alone_rounds,
        patience=args.patience,
    )
    report = run_plan(plan, workers=args.workers)
    print(f"report: {report} (curves: {report.with_suffix('.png')})")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from fedmarket.lab.grid import run_grid

    result = run_grid(
        args.configs,
        args.seeds,
        jobs_file=args.jobs_file,
        out=args.out,
        parallel=args.jobs,
        threads=args.threads,
        timeout=args.timeout,
        drop=args.drop_checkpoints,
        archive=args.archive,
        resume=args.resume,
        skip_archived=args.skip_archived,
        deadline=args.deadline,
        reserve=args.reserve,
    )
    print(
        f"{result.done}/{result.total} jobs finished in {result.wall:.0f} s wall ({args.jobs} at a time); "
        f"failed: {result.failed or 'none'}"
    )
    for folder in result.merged:
        print("merged", folder)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from fedmarket.lab.runs import merge_grid, merge_runs

    if args.grid:
        for folder in merge_grid(args.grid, args.out):
            print(folder)
    elif args.run_dirs:
        print(merge_runs(args.run_dirs, args.out))
    else:
        raise FedmarketError("merge needs RUN_DIR... or --grid ROOT")
    return 0


def cmd_first_phase(args: argparse.Namespace) -> int:
    from fedmarket.lab.runs import first_phase_run

    print(first_phase_run(args.run_dir, args.out, skip_missing=args.skip_missing))
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    from fedmarket.lab.runs import archive_runs

    written = archive_runs(args.paths, args.to)
    for path in written:
        print(path)
    print(f"{len(written)} file(s) written to {args.to}" if written else f"nothing new for {args.to}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from fedmarket.lab.runs import restore_runs

    for folder in restore_runs(args.archive, args.out, names=args.name or None):
        print(folder)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from fedmarket.status import find_run_dirs, format_status, run_status, without_merged_copies

    if args.stale_after <= 0:
        raise FedmarketError(f"--stale-after must be > 0 minutes, got {args.stale_after}")
    rows = [
        row
        for d in without_merged_copies(find_run_dirs(args.paths))
        for row in run_status(d, stale_after=60 * args.stale_after)
    ]
    print(format_status(rows))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from fedmarket.methods import METHODS, get_method

    get_method("local")
    for name, m in sorted(METHODS.items()):
        shared = ", ".join(m.declaration.patterns) or "nothing"
        print(f"{name:22s} {'private' if m.private else 'NOT PRIVATE':12s} uploads: {shared:40s} {m.summary}")
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    from fedmarket.config import load_config
    from fedmarket.flower.launch import run_on_flower

    mode = "simulation" if getattr(args, "flower_command", "deploy") == "simulate" else "deployment"
    if args.resume:
        from fedmarket.config import load_run_config

        cfg = load_run_config(args.resume)
        run_dir = Path(args.resume)
    elif args.config:
        cfg = load_config(args.config, _overrides(args))
        run_dir = None
    else:
        raise FedmarketError("needs CONFIG or --resume RUN_DIR")
    run_dir = run_on_flower(
        cfg,
        mode,
        run_dir=run_dir,
        resume=bool(args.resume),
        tls=args.tls,
        auth=getattr(args, "auth", False),
        timeout=args.timeout,
        reply_timeout=args.reply_timeout,
        clientapp=args.clientapp,
        poll_interval=args.poll_interval,
    )
    _print_run(run_dir)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedmarket.serving.export import comparison_runs, export_run, pick_winner

    run_dir = args.run_dir[0]
    runs = comparison_runs(args.run_dir)
    if len(args.run_dir) > 1 or len(runs) != 1 or Path(runs[0]) != Path(run_dir):
        # a comparison: export the winner of each named market
        if not args.market:
            raise FedmarketError("export from a comparison needs --market M (whose winner to export)")
        for market in args.market:
            winner, why = pick_winner(runs, market, args.metric)
            print(why)
            for folder in export_run(winner, args.out, [market], args.seed, args.data_dir):
                print(folder)
        return 0
    for folder in export_run(run_dir, args.out, args.market, args.seed, args.data_dir):
        print(folder)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    import torch

    from fedmarket.serving.recommender import Recommender, read_users, write_recommendations

    torch.set_num_threads(args.threads)
    rec = Recommender(args.export_dir)
    rec.check_task(args.task)
    frame = rec.recommend(read_users(args.users), args.k, args.exclude_history)
    write_recommendations(frame, args.out)
    if args.out:
        fallback = int((frame.groupby("user")["source"].first() == "popularity").sum()) if len(frame) else 0
        print(
            f"{frame['user'].nunique()} user(s), {len(frame)} rows -> {args.out} ({fallback} by popularity)"
        )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fedmarket.serving.app import serve

    serve(args.export_dir, args.host, args.port, args.threads)
    return 0


def _flower_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("config", nargs="?")
    sp.add_argument("--resume", metavar="RUN_DIR", help="continue a Flower run folder from its last round")
    sp.add_argument(
        "--tls", action="store_true", help="generate a CA and SuperLink certificate, connect over TLS"
    )
    sp.add_argument(
        "--auth",
        action="store_true",
        help="deployment with --tls: SuperNode authentication (a key pair per market, registered with the "
        "SuperLink; unregistered nodes are refused, each market bound to its node)",
    )
    sp.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds for the whole run")
    sp.add_argument(
        "--reply-timeout", type=float, default=600.0, help="seconds to wait for a market's reply each step"
    )
    sp.add_argument(
        "--clientapp",
        choices=("long-lived", "per-message"),
        default="long-lived",
        help="deployment: one long-lived ClientApp process per SuperNode (default), or Flower's fresh "
        "process per message",
    )
    sp.add_argument(
        "--poll-interval",
        type=float,
        default=None,
        metavar="S",
        help="deployment: cap on the SuperNodes' idle poll of the SuperLink (Flower: 3 s)",
    )
    sp.set_defaults(func=cmd_flower)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmarket", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"fedmarket {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--seeds", type=int, help="run seeds 0..N-1 (overrides the config)")
        sp.add_argument("--rounds", type=int, help="override train.rounds")
        sp.add_argument("--output-dir", help="override output_dir")
        sp.add_argument(
            "--data-dir", help="override dataset.data_dir (else $FEDMARKET_DATA or ../shared/data)"
        )
        sp.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override any config key, e.g. train.lr=0.001"
        )
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")

    r = sub.add_parser("run", help="run one experiment config")
    r.add_argument("config", nargs="?")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run folder")
    r.add_argument(
        "--previous-checkpoint",
        action="store_true",
        help="with --resume: if a seed's checkpoint is corrupt, continue from the one before it",
    )
    common(r)
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="run several configs and write one combined report")
    c.add_argument("configs", nargs="+")
    c.add_argument("--out", help="folder of the combined report")
    common(c)
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser(
        "demo", help="Local, FedAvg, FedProx, FedPer, Centralized and FedMM DeepFM on the 8 XMarket markets"
    )
    d.add_argument("--config-dir", default="configs")
    d.add_argument("--out")
    d.add_argument("--no-tracking", action="store_true", help="do not record the runs in MLflow (./mlruns)")
    common(d)
    d.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="dataset commands")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    info = data_sub.add_parser("info", help="markets, users, items, interactions")
    info.add_argument("dataset")
    info.add_argument("--data-dir")
    info.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="dataset option, e.g. path=my_markets/"
    )
    info.set_defaults(func=cmd_data_info)

    rep = sub.add_parser("report", help="combine run folders into one comparison report")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out")
    rep.set_defaults(func=cmd_report)

    gr = sub.add_parser(
        "grid",
        help="configs × seeds as parallel single-seed processes, then each config's seeds merged",
        description="Run a grid of experiments (configs × seeds, optional overrides) as parallel single-seed "
        "`fedmarket run` processes, one thread each, --jobs at a time; per-seed run folders in OUT/seed<N>/, "
        "logs in OUT/logs, each config's seeds merged into OUT/merged/<name> (docs/lab.md).",
    )
    gr.add_argument("configs", nargs="*")
    gr.add_argument(
        "--jobs-file",
        help="YAML list of jobs, each {config: PATH, seeds: [..], set: {key: value, ...}} (a sweep: set `name`)",
    )
    gr.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of each config (default: 0)")
    gr.add_argument(
        "--jobs",
        type=int,
        default=max(1, (os.cpu_count() or 2) - 1),
        help="processes at once (default: one fewer than the cores)",
    )
    gr.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    gr.add_argument("--timeout", type=float, default=None, help="seconds per job")
    gr.add_argument("--out", default="runs/grid")
    gr.add_argument(
        "--drop-checkpoints",
        action="store_true",
        help="delete the round checkpoints of the jobs that finished (others under --out are kept)",
    )
    gr.add_argument(
        "--archive",
        metavar="DIR",
        help="archive each job's seed record there as soon as it finishes (`fedmarket archive`: small, "
        "committable; seeds from many grids accumulate, `fedmarket restore DIR` merges them)",
    )
    gr.add_argument(
        "--resume",
        action="store_true",
        help="continue each job's interrupted run folder under --out from its last checkpoint",
    )
    gr.add_argument(
        "--skip-archived",
        action="store_true",
        help="with --archive: leave out the jobs whose seed record is archived there under the same config "
        "(a grid of remaining work, restarted until every job is archived, runs each job once)",
    )
    gr.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds for the whole grid: running jobs are killed at it (the merge still runs)",
    )
    gr.add_argument("--reserve", type=float, default=0.0, help="no job starts later than deadline - reserve")
    gr.set_defaults(func=cmd_grid)

    ob = sub.add_parser(
        "onboard",
        help="what joining the federation is worth for a new market, by how much data it arrives with",
        description="For each --market as the newcomer, with only the first k %% of its train data by time: "
        "local alone, one-to-one transfer from the best source, joining the running federation late, and "
        "joining from the start; test metric vs k with 95 %% intervals over seeds (OUT/onboard.md, .png).",
    )
    ob.add_argument("config", help="an experiment config of a FedAvg-family method")
    ob.add_argument("--market", nargs="+", required=True, help="the newcomer market(s), each in turn")
    ob.add_argument(
        "--fractions", type=float, nargs="+", help="k in %% of own train data (default 5 10 25 50 100)"
    )
    ob.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    ob.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="late and start: the newcomer's rounds in the federation before it trains alone (default 5)",
    )
    ob.add_argument(
        "--alone-rounds",
        type=int,
        default=200,
        help="every option's training alone (after the federation for late and start): at most this many "
        "rounds, stopped at the validation plateau (default 200)",
    )
    ob.add_argument(
        "--patience", type=int, default=3, help="validation patience of the training alone (default 3)"
    )
    ob.add_argument(
        "--join-round", type=int, default=3, help="late: the round it joins the federation (default 3)"
    )
    ob.add_argument(
        "--out", required=True, help="folder of the cells and the report (an interrupted study resumes)"
    )
    ob.add_argument("--workers", type=int, default=1, help="cells run at once, in processes (default 1)")
    ob.add_argument("--report-only", action="store_true", help="rewrite the report from the finished cells")
    ob.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    ob.add_argument("--data-dir", help="dataset.data_dir")
    ob.set_defaults(func=cmd_onboard, no_progress=True)

    mg = sub.add_parser(
        "merge", help="combine run folders of one config that ran different seeds into one run folder"
    )
    mg.add_argument("run_dirs", nargs="*")
    mg.add_argument("--grid", metavar="ROOT", help="merge every finished run under ROOT by config name")
    mg.add_argument("--out", required=True, help="new folder (with --grid: one sub-folder per config)")
    mg.set_defaults(func=cmd_merge)

    fp = sub.add_parser(
        "first-phase",
        help="a phased run (FedAvg/FeCoSR + fine-tune, one-to-one transfer) as if it had stopped where its "
        "first phase ended at its plateau: the pre-trained model without fine-tuning, no extra training",
    )
    fp.add_argument("run_dir")
    fp.add_argument("--out", required=True, help="new run folder")
    fp.add_argument(
        "--skip-missing",
        action="store_true",
        help="keep the seeds that recorded the phase end, drop the others",
    )
    fp.set_defaults(func=cmd_first_phase)

    ar = sub.add_parser(
        "archive",
        help="keep the per-seed records of finished runs in a small committable archive "
        "(ARCHIVE/<config name>/seed<N>.json.gz): seeds run at different times or places accumulate there",
    )
    ar.add_argument("paths", nargs="+", metavar="RUN_DIR|ROOT")
    ar.add_argument("--to", required=True, metavar="ARCHIVE", help="archive folder, e.g. results/fecosr")
    ar.set_defaults(func=cmd_archive)

    rs = sub.add_parser(
        "restore", help="merged run folders (every archived seed of each config) from an archive"
    )
    rs.add_argument("archive", metavar="ARCHIVE")
    rs.add_argument("--out", required=True, help="folder for the run folders, one per config")
    rs.add_argument("--name", nargs="+", action="extend", help="only these configs (repeatable)")
    rs.set_defaults(func=cmd_restore)

    st = sub.add_parser(
        "status", help="how far each seed of run folders (or every run folder under a root) has got"
    )
    st.add_argument("paths", nargs="+", metavar="RUN_DIR|ROOT")
    st.add_argument(
        "--stale-after",
        type=float,
        default=30.0,
        metavar="MIN",
        help="a checkpoint older than this many minutes is reported as stalled (default 30)",
    )
    st.set_defaults(func=cmd_status)

    ex = sub.add_parser(
        "export",
        help="each market's selected model of a run as a self-contained folder (model card included)",
    )
    ex.add_argument(
        "run_dir",
        nargs="+",
        help="a run folder, or a comparison (its report folder, or several run folders): then the winner "
        "of each --market is exported",
    )
    ex.add_argument(
        "--metric",
        help="with a comparison: the metric that names the winner (default: the runs' eval.select_metric)",
    )
    ex.add_argument("--out", required=True, help="folder that receives one sub-folder per market")
    ex.add_argument("--market", action="append", help="only this market (repeatable; default: all)")
    ex.add_argument("--seed", type=int, help="which seed's models (default: the run's first)")
    ex.add_argument("--data-dir", help="the run's data (else $FEDMARKET_DATA or the config's)")
    ex.set_defaults(func=cmd_export)

    rc = sub.add_parser("recommend", help="top-K catalog items per user from an export")
    rc.add_argument("export_dir")
    rc.add_argument("--users", required=True, help="CSV with a user column (else its first column is used)")
    rc.add_argument("--k", type=int, default=10)
    rc.add_argument("--exclude-history", action="store_true", help="leave out each user's train items")
    rc.add_argument("--task", choices=["ctr", "ctcvr"], help="multi-task exports only")
    rc.add_argument("--out", help="recs.csv or recs.parquet (default: CSV on stdout)")
    rc.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    rc.set_defaults(func=cmd_recommend)

    sv = sub.add_parser("serve", help="serve an export over HTTP: /recommend, /score, /health, /card")
    sv.add_argument("export_dir")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    sv.set_defaults(func=cmd_serve)

    m = sub.add_parser("methods", help="list methods and what each lets leave a market")
    m.set_defaults(func=cmd_methods)

    fl = sub.add_parser("flower", help="run a config on Flower (simulation or local Deployment Engine)")
    fl_sub = fl.add_subparsers(dest="flower_command", required=True)
    for name, text in (
        ("simulate", "flwr run on the simulation SuperLink (Ray, 1 CPU per market)"),
        ("deploy", "a SuperLink and one SuperNode per market on 127.0.0.1, each a separate process"),
    ):
        sp = fl_sub.add_parser(name, help=text)
        _flower_args(sp)
        common(sp)
    dep = sub.add_parser("deploy", help="= fedmarket flower deploy")
    _flower_args(dep)
    common(dep)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if args.command == "run" and not args.config and not args.resume:
        parser.error("run needs CONFIG or --resume RUN_DIR")
    try:
        return args.func(args)
    except FedmarketError as exc:
        print(f"fedmarket: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from fedmarket import api

        folder = api.ACTIVE_RUN_DIR
        hint = f"; continue with: fedmarket run --resume {folder}" if folder is not None else ""
        print(f"fedmarket: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
