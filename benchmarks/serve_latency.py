"""Serving latency of an exported model on the largest XMarket market (export → recommend → serve).

1. Train Local DeepFM (configs/xmrec_local.yaml) for a few rounds on the largest market only (most
   interactions, found with `fedmarket.data.dataset_info`), or take ``--run RUN_DIR``; export that market.
2. In process: `Recommender.recommend([user], k=10)` over the market's full catalog, one user per call,
   torch threads = 1: p50 / p99 latency.
3. Over HTTP: ``fedmarket serve`` in a subprocess (threads = 1), sequential ``GET /recommend?user=&k=10``
   on one keep-alive connection: p50 / p99 latency and throughput (requests/s).

Target: p99 < 50 ms for both. Results: benchmarks/results/serve_latency.{json,md}.

    FEDMARKET_DATA=... .venv/bin/python benchmarks/serve_latency.py [--rounds 3] [--requests 1000] [--run RUN_DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TARGET_P99_MS = 50.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def largest_market(data_dir: str | None) -> tuple[str, dict]:
    from fedmarket.data import dataset_info

    frame = dataset_info("xmrec", data_dir=data_dir)
    row = frame.sort_values("interactions", ascending=False).iloc[0]
    return str(row["market"]), {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


def train(market: str, rounds: int, out: Path, data_dir: str | None) -> Path:
    from fedmarket.api import run_experiment
    from fedmarket.config import load_config

    overrides = {
        "dataset.markets": [market],
        "train.rounds": rounds,
        "output_dir": str(out),
        "progress": False,
        "name": f"serve_bench_local_{market}",
    }
    if data_dir:
        overrides["dataset.data_dir"] = data_dir
    return run_experiment(load_config(REPO / "configs" / "xmrec_local.yaml", overrides))


def percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "max_ms": float(a.max()),
        "n": len(ms),
    }


def in_process(folder: Path, users: list[str], warmup: int) -> dict:
    import torch

    from fedmarket.serving.recommender import Recommender

    torch.set_num_threads(1)
    rec = Recommender(folder)
    for u in users[:warmup]:
        rec.recommend([u], 10)
    ms = []
    t_all = time.perf_counter()
    for u in users:
        t0 = time.perf_counter()
        rec.recommend([u], 10)
        ms.append(1000 * (time.perf_counter() - t0))
    total = time.perf_counter() - t_all
    return {**percentiles(ms), "throughput_rps": len(users) / total, "catalog_items": rec.num_catalog}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def over_http(folder: Path, users: list[str], warmup: int) -> dict:
    from urllib.parse import quote

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fedmarket", "serve", str(folder), "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/health")
                if conn.getresponse().read() and True:
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        f"server did not start: {proc.stderr.read().decode()[-500:]}"
                    ) from None
                time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

        def get(u: str) -> None:
            conn.request("GET", f"/recommend?user={quote(u)}&k=10")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"/recommend answered {resp.status}: {body[:200]!r}")

        for u in users[:warmup]:
            get(u)
        ms = []
        t_all = time.perf_counter()
        for u in users:
            t0 = time.perf_counter()
            get(u)
            ms.append(1000 * (time.perf_counter() - t0))
        total = time.perf_counter() - t_all
        return {**percentiles(ms), "throughput_rps": len(users) / total}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="an existing run folder (xmrec, in process) instead of training")
    ap.add_argument("--market", help="default: the largest XMarket market")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--data-dir", default=os.environ.get("FEDMARKET_DATA"))
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--keep", action="store_true", help="keep the temporary run and export folder")
    args = ap.parse_args()

    import pandas as pd

    from fedmarket.serving.export import export_run

    market, info = largest_market(args.data_dir)
    market = args.market or market
    work = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    t0 = time.perf_counter()
    run_dir = Path(args.run) if args.run else train(market, args.rounds, work / "runs", args.data_dir)
    train_s = time.perf_counter() - t0
    folder = export_run(run_dir, work / "export", [market], data_dir=args.data_dir)[0]
    users = pd.read_csv(folder / "users.csv", dtype={"user": str}, keep_default_na=False)["user"].tolist()
    rng = np.random.default_rng(0)
    picked = [users[i] for i in rng.integers(0, len(users), size=args.requests)]
    local = in_process(folder, picked, args.warmup)
    http_ = over_http(folder, picked, args.warmup)
    card = json.loads((folder / "card.json").read_text())
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "serve_latency",
        "market": market,
        "market_info": info,
        "model": "local deepfm (configs/xmrec_local.yaml)",
        "train_rounds": None if args.run else args.rounds,
        "train_seconds": None if args.run else train_s,
        "selected_round": card.get("selected_round"),
        "test_auc": card["metrics"]["seed"].get("auc"),
        "k": 10,
        "torch_threads": 1,
        "catalog_items": local.pop("catalog_items"),
        "in_process": local,
        "http": http_,
        "target_p99_ms": TARGET_P99_MS,
        "meets_target": bool(local["p99_ms"] < TARGET_P99_MS and http_["p99_ms"] < TARGET_P99_MS),
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_1min_after": os.getloadavg()[0],
        },
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_latency.json").write_text(json.dumps(result, indent=2))
    md = [
        "# Serving latency (top-10 over the full catalog)",
        "",
        f"Local DeepFM on XMarket `{market}` ({info.get('users')} users, {info.get('items')} items, "
        f"{info.get('interactions')} interactions; catalog {result['catalog_items']} items), selected round "
        f"{result['selected_round']}, test AUC {result['test_auc']:.4f}. One user per request, torch threads = 1, "
        f"{args.requests} requests after {args.warmup} warm-up; HTTP: `fedmarket serve` in its own process, "
        "sequential requests on one keep-alive connection.",
        "",
        "| path | p50 ms | p99 ms | requests/s |",
        "|---|---|---|---|",
        f"| in process (`Recommender.recommend`) | {local['p50_ms']:.2f} | {local['p99_ms']:.2f} | "
        f"{local['throughput_rps']:.0f} |",
        f"| HTTP `GET /recommend` | {http_['p50_ms']:.2f} | {http_['p99_ms']:.2f} | {http_['throughput_rps']:.0f} |",
        "",
        f"Target p99 < {TARGET_P99_MS:.0f} ms: {'met' if result['meets_target'] else 'NOT met'}. "
        f"Machine: {result['machine']['cpu']} ({result['machine']['logical_cpus']} logical CPUs, shared with "
        f"other jobs while measured: 1-min load average {result['machine']['load_average_1min_after']:.1f}).",
        "",
    ]
    (out / "serve_latency.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
