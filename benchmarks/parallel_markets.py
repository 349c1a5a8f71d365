"""Markets in parallel: wall time of one in-process run with ``train.parallel_markets`` workers, as a ratio to
the serial run of the same config in the same process (same data, same seed; the results are bit-identical,
asserted here too).

    .venv/bin/python benchmarks/parallel_markets.py [--config configs/xmrec_fedavg.yaml] [--rounds 3] \
        [--workers 2] [--out benchmarks/results/parallel_markets.json]

Target: ≤ 0.6 × the serial wall time on an idle 2-core machine with the 8 XMarket markets. The ratio depends on
how evenly the markets' work splits over the workers (the largest market bounds a round) and on what else
the machine runs; the script prints both runs' seconds and the machine's core count.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/xmrec_fedavg.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/parallel_markets.json")
    args = ap.parse_args()

    from fedmarket.api import run_seed
    from fedmarket.config import load_config
    from fedmarket.data.prepare import prepare_data

    cfg = load_config(args.config)
    cfg.train.rounds = args.rounds
    cfg.train.patience = 0
    cfg.progress = False
    data = prepare_data(cfg)  # loaded once, outside both timings
    rounds = cfg.train.rounds
    cfg.train.rounds = 1  # warm-up (lazy initialisation, caches), untimed
    run_seed(cfg, 0, data, None, False)
    cfg.train.rounds = rounds
    results, seconds = {}, {}
    for workers in (0, args.workers):
        cfg.train.parallel_markets = workers
        t0 = time.perf_counter()
        results[workers] = run_seed(cfg, 0, data, None, False)
        seconds[workers] = time.perf_counter() - t0
    serial, parallel = results[0], results[args.workers]
    assert serial.test == parallel.test and serial.history == parallel.history, "parallel != serial"
    out = {
        "config": args.config,
        "markets": len(serial.communication),
        "rounds": args.rounds,
        "workers": args.workers,
        "cores": len(os.sched_getaffinity(0)),
        "serial_s": round(seconds[0], 2),
        "parallel_s": round(seconds[args.workers], 2),
        "ratio": round(seconds[args.workers] / seconds[0], 3),
        "bit_identical": True,
    }
    print(json.dumps(out, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
