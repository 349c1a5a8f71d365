"""Leave-one-out split of a large market: CPU seconds and peak memory, as a ratio to sorting the same rows.

    .venv/bin/python benchmarks/split_scale.py [--rows 6500000] [--out benchmarks/results/split_scale.json]

A synthetic market the size of a big real one (6.5 M interactions, 400 k users, 100 k items, Zipf-popular items,
repeated rows included) is split under protocol 2 (catalog rule, collapsed repeats, 99 sampled negatives per
held-out item). The reference, in the same process, is one stable lexsort of the rows by (user, time): the
least any time-ordered split must do. Target: split ≤ 30 s CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np


def market(rows: int, users: int, items: int, seed: int = 0):
    from fedmarket.data.market import MarketData

    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, rows)
    pop = 1.0 / np.arange(1, items + 1) ** 0.8
    i = rng.choice(items, size=rows, p=pop / pop.sum())
    t = rng.integers(1_500_000_000, 1_700_000_000, rows)
    return MarketData(
        "big",
        u,
        i,
        t,
        np.array([f"u{k}" for k in range(users)], dtype=object),
        np.arange(items).astype(str).astype(object),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=6_500_000)
    ap.add_argument("--users", type=int, default=400_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--out", default="benchmarks/results/split_scale.json")
    args = ap.parse_args()
    from fedmarket.data.split import leave_one_out

    m = market(args.rows, args.users, args.items)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    c0 = time.process_time()
    np.lexsort((np.arange(m.num_interactions), m.timestamps, m.users))
    reference = time.process_time() - c0
    c0, w0 = time.process_time(), time.perf_counter()
    split = leave_one_out(m)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "rows": args.rows,
        "users": args.users,
        "items": args.items,
        "evaluated_users": int(len(split.test)),
        "split_cpu_s": round(cpu, 2),
        "split_wall_s": round(wall, 2),
        "reference_sort_cpu_s": round(reference, 2),
        "ratio_to_sort": round(cpu / max(reference, 1e-9), 1),
        "peak_rss_mb": round(peak / 1024, 1),
        "rss_before_split_mb": round(rss0 / 1024, 1),
        "target": "split_cpu_s <= 30",
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
