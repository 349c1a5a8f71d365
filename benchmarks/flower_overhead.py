"""Per-round overhead of Flower (the Deployment Engine, optionally simulation) against the in-process runtime
and against Flower's own floor, for the same config, and where the time goes.

    .venv/bin/python benchmarks/flower_overhead.py [--rounds 3] [--markets in jp] [--simulation]
        [--variants per-message:3 long-lived:3 long-lived:0.2]

A variant is ``CLIENTAPP:POLL``: how each SuperNode runs its ClientApp (``per-message``: Flower's default,
a fresh process per message; ``long-lived``: one process per SuperNode, `fedmarket.flower.worker`) and the
cap on the SuperNode's idle poll of the SuperLink in seconds (3 = Flower's own). For each variant the
**floor** is a round of a no-op ClientApp/ServerApp (``benchmarks/flower_noop_app.py``: a train and an
evaluate message to every node, a 17 KB array echoed back) on the same processes and poll settings, and
fedmarket's round is measured right after it; ``ratio_to_floor`` = fedmarket's round / the floor.

Writes ``benchmarks/results/flower_overhead.json``. Per round = wall seconds of one train + evaluate round
(the final test step and start-up are reported separately). The per-message breakdown comes from the
ClientApp's own timings (``flower_timing.json`` in each run folder): handler time (data, model build, state
load/save, compute) against the server-side round trip; ``task_start_to_handler`` is the ClientApp process's
age at the handler (per-message) or the time since it acquired the task (long-lived).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fedmarket.config import config_from_dict
from fedmarket.data.paths import resolve_data_dir

ROOT = Path(__file__).resolve().parents[1]


def base_config(out: Path, markets: list[str], rounds: int) -> dict:
    return {
        "name": "flower_overhead",
        "dataset": {"name": "xmrec", "markets": markets, "data_dir": str(resolve_data_dir(None))},
        "method": {"name": "fedavg"},
        "train": {"rounds": rounds, "batch_size": 1024},
        "eval": {"full_ranking": False},
        "output_dir": str(out),
        "progress": False,
    }


def in_process(cfg_dict: dict) -> dict:
    from fedmarket.api import run_experiment
    from fedmarket.federation.runtime import Simulator

    seconds: list[float] = []
    original = Simulator.run_round

    def timed(self, server_round):
        t0 = time.perf_counter()
        original(self, server_round)
        seconds.append(time.perf_counter() - t0)

    Simulator.run_round = timed
    try:
        t0 = time.perf_counter()
        run_dir = run_experiment(config_from_dict({**cfg_dict, "name": "inproc"}))
        wall = time.perf_counter() - t0
    finally:
        Simulator.run_round = original
    return {"wall_s": wall, "per_round_s": float(np.mean(seconds)), "run_dir": str(run_dir)}


NOOP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "flower-noop"
version = "0.1.0"
dependencies = []

[tool.flwr.app]
publisher = "fedmarket"

[tool.flwr.app.components]
serverapp = "flower_noop_app:server_app"
clientapp = "flower_noop_app:client_app"

[tool.flwr.app.config]
rounds = 3
nodes = 2
out = ""
"""


def floor(tmp: Path, markets: list[str], rounds: int, clientapp: str, poll: float | None) -> dict:
    """Flower's own round: the no-op app on a SuperLink and one SuperNode per market, as fedmarket's."""
    from fedmarket.flower.launch import LocalFederation

    home = tmp / f"floor-{clientapp}-{poll}"
    app = home / "app"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(NOOP_PYPROJECT)
    shutil.copy(ROOT / "benchmarks" / "flower_noop_app.py", app / "flower_noop_app.py")
    out = home / "rounds.json"
    with LocalFederation(home, clientapp=clientapp, poll_interval=poll) as fed:
        fed.start_superlink()
        for market in markets:
            fed.start_supernode(market)
        proc = fed.submit(app, {"rounds": rounds, "nodes": len(markets), "out": str(out)})
        deadline = time.monotonic() + 600
        while not out.exists() or proc.poll() is None:
            if time.monotonic() > deadline or (proc.poll() not in (None, 0)):
                raise RuntimeError(f"no-op run failed:\n{fed.log_tail('flwr-run')}")
            time.sleep(0.2)
    seconds = json.loads(out.read_text())
    return {"per_round_s": float(np.mean(seconds)), "rounds_s": seconds}


def on_flower(cfg_dict: dict, mode: str, clientapp: str = "long-lived", poll: float | None = None) -> dict:
    from fedmarket.flower.launch import run_on_flower

    t0 = time.perf_counter()
    run_dir = run_on_flower(
        config_from_dict({**cfg_dict, "name": f"{mode}-{clientapp}"}),
        mode,
        timeout=1200,
        clientapp=clientapp,
        poll_interval=poll,
    )
    wall = time.perf_counter() - t0
    rows = json.loads((run_dir / "flower_timing.json").read_text())
    rounds = [r["seconds"] for r in rows if r["stage"] == "round"]
    messages = [r for r in rows if r["stage"] in ("train", "evaluate")]

    def mean(key: str) -> float:
        return float(np.mean([r.get(key, 0.0) for r in messages]))

    handler = mean("handler")
    return {
        "wall_s": wall,
        "per_round_s": float(np.mean(rounds)),
        "per_message_mean_s": {
            "round_trip": mean("round_trip"),
            "handler_total": handler,
            "compute": mean("compute"),
            "model_build": mean("build"),
            "data_load": mean("data"),
            "state_load": mean("state_load"),
            "state_save": mean("state_save"),
            "outside_handler (polls + process start + transport)": mean("round_trip") - handler,
            "task_start_to_handler (in the outside part)": mean("process_age"),
        },
        "cache_hit_rate": mean("cache_hit"),
        "split_from_disk_rate": mean("split_from_disk"),
        "run_dir": str(run_dir),
    }


def cold_import_seconds() -> float:
    """A fresh process importing the ClientApp module: part of what the Deployment Engine pays per message
    (``process_start_to_handler`` adds Flower's own start-up: its imports, connecting, the FAB install)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import fedmarket.flower.app"], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--markets", nargs="+", default=["in", "jp"])
    ap.add_argument("--simulation", action="store_true", help="also Flower simulation")
    ap.add_argument("--variants", nargs="+", default=["per-message:3", "long-lived:3", "long-lived:0.2"])
    args = ap.parse_args()
    for k, v in {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }.items():
        os.environ.setdefault(k, v)
    command = "python benchmarks/flower_overhead.py " + " ".join(
        [f"--rounds {args.rounds}", "--markets " + " ".join(args.markets)]
        + (["--simulation"] if args.simulation else [])
        + ["--variants " + " ".join(args.variants)]
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = base_config(Path(tmp), args.markets, args.rounds)
        result: dict = {
            "command": command,
            "config": {"markets": args.markets, "rounds": args.rounds, "method": "fedavg-deepfm"},
        }
        result["in_process"] = in_process(cfg)
        result["in_process"].pop("run_dir")
        base = result["in_process"]["per_round_s"]
        if args.simulation:
            result["simulation"] = on_flower(cfg, "simulation")
            result["simulation"].pop("run_dir")
            result["simulation"]["ratio_to_in_process"] = result["simulation"]["per_round_s"] / base
        result["deployment"] = {}
        for variant in args.variants:
            clientapp, poll_text = variant.split(":")
            poll = None if float(poll_text) == 3 else float(poll_text)  # 3 s: Flower's own SuperNode
            row = {"floor": floor(Path(tmp), args.markets, args.rounds, clientapp, poll)}
            row["fedmarket"] = on_flower(cfg, "deployment", clientapp, poll)
            row["fedmarket"].pop("run_dir")
            row["ratio_to_floor"] = row["fedmarket"]["per_round_s"] / row["floor"]["per_round_s"]
            row["ratio_to_in_process"] = row["fedmarket"]["per_round_s"] / base
            result["deployment"][variant] = row
            print(
                f"{variant:18s} floor {row['floor']['per_round_s']:.2f} s/round, fedmarket "
                f"{row['fedmarket']['per_round_s']:.2f} s/round: {row['ratio_to_floor']:.2f}x the floor, "
                f"{row['ratio_to_in_process']:.0f}x in-process ({base:.2f} s)",
                flush=True,
            )
        result["cold_import_fedmarket_flower_app_s"] = cold_import_seconds()
    out = ROOT / "benchmarks" / "results" / "flower_overhead.json"
    if out.exists():  # keep the last figures next to the new ones, to compare a change
        previous = json.loads(out.read_text())
        previous.pop("previous", None)
        result["previous"] = previous
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
