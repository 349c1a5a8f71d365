"""Round-driver overhead: the share of an in-process round spent in the driver and its ledger (selection, upload
checks, aggregation, byte counting, best-round bookkeeping, the kept copy of a best state, the checkpoint) rather
than in the markets' own training, evaluation and testing.

    .venv/bin/python benchmarks/driver_overhead.py [--config configs/xmrec_fedavg.yaml] [--rounds 3] \
        [--out benchmarks/results/driver_overhead.json]

One run of the config, serial, with a transport that times its calls into the markets; overhead = the run's
wall time − the time inside those calls, as a fraction of the wall time (both from the same run, so the ratio
holds on a loaded machine too). Measured twice: without and with a checkpoint after every round. Target: < 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/xmrec_fedavg.yaml")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/driver_overhead.json")
    args = ap.parse_args()

    from fedmarket.api import protect
    from fedmarket.config import load_config
    from fedmarket.data.prepare import prepare_data
    from fedmarket.federation.driver import Driver, DriverSettings
    from fedmarket.federation.runtime import InProcessTransport
    from fedmarket.matmul import configure_torch
    from fedmarket.methods import get_method

    class Timed(InProcessTransport):
        inside = 0.0

        def _timed(self, fn, *a):
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                Timed.inside += time.perf_counter() - t0

        def train(self, *a):
            return self._timed(super().train, *a)

        def evaluate(self, *a):
            return self._timed(super().evaluate, *a)

        def test(self, *a):
            return self._timed(super().test, *a)

    cfg = load_config(args.config)
    cfg.progress = False
    configure_torch(cfg.train.threads, cfg.train.matmul)
    data = prepare_data(cfg)
    method = get_method(cfg.method.name)
    opts = method.parse_options(cfg.method.options)
    rows = {}
    for label in ("warm-up", "no checkpoint", "checkpoint every round"):
        trainers, strategy = method.build(cfg, opts, data.splits, 0)
        trainers, strategy = protect(cfg, trainers, strategy, 0)
        settings = DriverSettings.from_config(cfg, 0)
        settings = DriverSettings(**{**settings.__dict__, "rounds": 1 if label == "warm-up" else args.rounds})
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "seed0.ckpt" if label.startswith("checkpoint") else None
            driver = Driver(
                Timed(trainers),
                strategy,
                method.declaration_for(cfg, opts),
                settings,
                checkpoint_path=ckpt,
                progress=False,
            )
            Timed.inside = 0.0
            t0 = time.perf_counter()
            driver.run()
            wall = time.perf_counter() - t0
        if label == "warm-up":
            continue
        rows[label] = {
            "wall_s": round(wall, 3),
            "in_markets_s": round(Timed.inside, 3),
            "driver_s": round(wall - Timed.inside, 3),
            "overhead": round((wall - Timed.inside) / wall, 4),
        }
        print(
            f"{label}: wall {wall:.2f} s, in the markets {Timed.inside:.2f} s, driver {(wall - Timed.inside) / wall:.1%}"
        )
    out = {
        "config": args.config,
        "rounds": args.rounds,
        "markets": len(data.splits),
        "cores": os.cpu_count(),
        "runs": rows,
        "target": "< 5 % of a round",
        "command": f".venv/bin/python benchmarks/driver_overhead.py --config {args.config} --rounds {args.rounds}",
    }
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
