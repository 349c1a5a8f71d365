"""PF-MSMTrec / MMoE client throughput on one real scenario: the current `MTLClient` against the
pre-speed-up reference (`benchmarks/legacy_mtl.py`), timed in the same process on the same tensors.

For each of ``--repeats`` rounds, both trainers (built from the same seed) run the same round — `fit`
(one local epoch, PF-MSMTrec's proximal term) then `evaluate` on the validation split — in alternating order,
and the parameters of the two are checked to be bit-identical after every round. Times are process CPU
seconds (`time.process_time`), which a busy machine distorts less than wall time; the speed-up is the ratio
old/new of the summed times. Writes ``benchmarks/results/mtl_throughput.json``.

    FEDMARKET_DATA=... .venv/bin/python benchmarks/mtl_throughput.py \
        [--config configs/ml1m-proxy-age_pfmsmt.yaml] [--scenario age18] [--repeats 3] [--max-batches 0] \
        [--matmul auto]  # fp32 matmul kernels for both trainers, as train.matmul (`fedmarket.matmul`)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from legacy_mtl import LegacyMTLClient  # noqa: E402

from fedmarket.config import MATMUL_CHOICES, load_config  # noqa: E402
from fedmarket.data.prepare import prepare_data  # noqa: E402
from fedmarket.federation.core import RoundConfig  # noqa: E402
from fedmarket.matmul import configure_torch  # noqa: E402
from fedmarket.methods.base import get_method  # noqa: E402
from fedmarket.methods.mtl_trainer import MTLClient  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/ml1m-proxy-age_pfmsmt.yaml")
    ap.add_argument("--scenario", default="age18")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-batches", type=int, default=0, help="train on the first N batches only (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--matmul", default="auto", choices=MATMUL_CHOICES, help="fp32 matmul kernels, as train.matmul"
    )
    ap.add_argument("--out", default="benchmarks/results/mtl_throughput.json")
    args = ap.parse_args()
    kernels = configure_torch(args.threads, args.matmul)

    cfg = load_config(args.config)
    method = get_method(cfg.method.name)
    trainers, strategy = method.build(
        cfg, method.parse_options(cfg.method.options), prepare_data(cfg).splits, 0
    )
    built = trainers[args.scenario]  # the runtime's trainer: its data, upload and model options
    data = copy.copy(built.data)
    if args.max_batches:
        data.train_index = data.train_index[: args.max_batches * built.batch_size]
    clients = {
        name: cls(  # the runtime's constructor arguments (mtl_clients / the method's build)
            args.scenario,
            data,
            built.upload_declaration,
            model_options=built.model_options,
            lr=built.lr,
            weight_decay=built.weight_decay,
            batch_size=built.batch_size,
            seed=0,
        )
        for name, cls in (("old", LegacyMTLClient), ("new", MTLClient))
    }

    payload = clients["old"].initial_payload()
    train_rows = len(data.train_index)
    valid_rows = sum(len(v["valid"]) for v in data.views.values())
    times = {k: {"fit_s": 0.0, "eval_s": 0.0} for k in clients}
    identical = True
    for r in range(1, args.repeats + 1):
        rc = RoundConfig(round=r, local_epochs=1, seed=0, options=strategy.round_options(r))
        order = ("old", "new") if r % 2 else ("new", "old")
        evals = {}
        for name in order:
            c = clients[name]
            t = time.process_time()
            c.fit(payload, rc)
            times[name]["fit_s"] += time.process_time() - t
            t = time.process_time()
            evals[name] = c.evaluate(None, "valid")
            times[name]["eval_s"] += time.process_time() - t
        so, sn = clients["old"].model.state_dict(), clients["new"].model.state_dict()
        same = all(torch.equal(so[k], sn[k]) for k in so) and evals["old"] == evals["new"]
        identical &= same
        print(f"round {r}: identical={same} valid={evals['new'][args.scenario]}")
    out = {
        "config": args.config,
        "scenario": args.scenario,
        "repeats": args.repeats,
        "threads": args.threads,
        "matmul": args.matmul,
        "matmul_kernels": kernels,
        "train_rows_per_round": train_rows,
        "valid_rows_per_round": valid_rows,
        "bit_identical": identical,
    }
    for name, t in times.items():
        out[name] = {
            **{k: round(v, 3) for k, v in t.items()},
            "train_rows_per_s": round(train_rows * args.repeats / t["fit_s"], 1),
            "eval_rows_per_s": round(valid_rows * args.repeats / t["eval_s"], 1),
        }
    out["speedup_fit"] = round(times["old"]["fit_s"] / times["new"]["fit_s"], 3)
    out["speedup_eval"] = round(times["old"]["eval_s"] / times["new"]["eval_s"], 3)
    old_total = times["old"]["fit_s"] + times["old"]["eval_s"]
    out["speedup_round"] = round(old_total / (times["new"]["fit_s"] + times["new"]["eval_s"]), 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    if not identical:
        raise SystemExit("old and new trainers diverged")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
