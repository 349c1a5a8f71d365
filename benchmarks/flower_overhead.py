"""Per-round overhead of Flower (simulation and the Deployment Engine) against the in-process runtime, for
the same config, and where the time goes.

    .venv/bin/python benchmarks/flower_overhead.py [--rounds 3] [--markets in jp]

Writes ``benchmarks/results/flower_overhead.json``. Per round = wall seconds of one train + evaluate round
(the final test step and start-up are reported separately). The per-message breakdown comes from the
ClientApp's own timings (``flower_timing.json`` in each run folder): handler time (data, model build, state
load/save, compute) against the server-side round trip; the rest is the SuperNode's poll (a hard-coded 3 s in
Flower 1.41), the ClientApp process start-up (measured here separately as a cold ``import``) and transport.
"""

from __future__ import annotations

import argparse
import json
import os
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


def on_flower(cfg_dict: dict, mode: str) -> dict:
    from fedmarket.flower.launch import run_on_flower

    t0 = time.perf_counter()
    run_dir = run_on_flower(config_from_dict({**cfg_dict, "name": mode}), mode, timeout=1200)
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
            "outside_handler (poll + process start + transport)": mean("round_trip") - handler,
            "process_start_to_handler (imports + FAB install; in the outside part)": mean("process_age"),
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
    args = ap.parse_args()
    for k, v in {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }.items():
        os.environ.setdefault(k, v)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = base_config(Path(tmp), args.markets, args.rounds)
        result = {"config": {"markets": args.markets, "rounds": args.rounds, "method": "fedavg-deepfm"}}
        result["in_process"] = in_process(cfg)
        result["simulation"] = on_flower(cfg, "simulation")
        result["deployment"] = on_flower(cfg, "deployment")
        result["cold_import_fedmarket_flower_app_s"] = cold_import_seconds()
        base = result["in_process"]["per_round_s"]
        result["ratio_per_round"] = {
            "simulation": result["simulation"]["per_round_s"] / base,
            "deployment": result["deployment"]["per_round_s"] / base,
        }
        for key in ("in_process", "simulation", "deployment"):
            result[key].pop("run_dir")
    out = ROOT / "benchmarks" / "results" / "flower_overhead.json"
    if out.exists():  # keep the last figures next to the new ones, to compare a change
        previous = json.loads(out.read_text())
        previous.pop("previous", None)
        result["previous"] = previous
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
