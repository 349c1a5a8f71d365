"""Server-side cost of PF-MSMTrec per round: conflict coordination (PCGrad over client updates) plus
personalised aggregation, for 10 and 100 scenarios, as a share of a round's time.

The payload is the real PF-MSMTrec upload of the MMoE used in ``configs/ml1m-proxy-*_pfmsmt.yaml``
(feature embeddings, 2 shared + 2 task-specific experts, 2 towers); updates are random. A round's client
time is measured by training the same model for one local epoch on ``--rows`` synthetic impressions
(ML-1M-proxy fields) in this process, so both sides run on the same machine and thread count.

    .venv/bin/python benchmarks/pfmsmt_server_cost.py --scenarios 10 100 --rows 50000

Reports, per K: server seconds (coordination + personalisation, and personalisation only), one client's
epoch, and the server's share of a round when clients train in parallel (deployment: round = slowest client
+ server) and sequentially (the in-process simulator: round = K clients + server).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

# one BLAS thread, like the one torch intra-op thread the project runs with: on a shared 2-core machine a
# multi-threaded BLAS spins and makes the small K×K products look 10x slower than they are
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedmarket.federation.core import RoundConfig  # noqa: E402
from fedmarket.federation.personalized import personalized_aggregate  # noqa: E402
from fedmarket.methods.mtl_trainer import MTLClient, MTLData  # noqa: E402
from fedmarket.methods.pfmsmt import PFMSMTOptions, client_upload, module_of  # noqa: E402

FIELDS = {
    "id_user": 1000,
    "id_item": 3500,
    "feat_gender": 3,
    "feat_occupation": 22,
    "feat_genre": 19,
    "feat_year_bucket": 27,
    "feat_genre2": 19,
}
MODEL = dict(
    embed_dim=8,
    num_shared_experts=2,
    num_task_experts=1,
    num_scenario_experts=1,
    expert_hidden=(32,),
    tower_hidden=(16,),
    dropout=0.1,
)


def synthetic_data(rows: int, seed: int = 0) -> MTLData:
    rng = np.random.default_rng(seed)
    sparse = np.stack([rng.integers(0, v, rows) for v in FIELDS.values()], axis=1)
    click = (rng.random(rows) < 1 / 3).astype(np.float32)
    ctcvr = click * (rng.random(rows) < 0.22).astype(np.float32)
    idx = np.arange(rows)
    return MTLData(
        sparse=torch.from_numpy(sparse),
        dense=torch.zeros(rows, 0),
        click=torch.from_numpy(click),
        ctcvr=torch.from_numpy(ctcvr),
        fields=dict(FIELDS),
        train_index=idx,
        views={"s": {"valid": idx[:1000], "test": idx[:1000]}},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--rows", type=int, default=50_000, help="train impressions per scenario")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/pfmsmt_server_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    upload = client_upload(PFMSMTOptions())
    client = MTLClient("s", synthetic_data(args.rows), upload, model_options=MODEL, batch_size=2048)
    start = client.initial_payload()
    t0 = time.perf_counter()
    client.fit(start, RoundConfig(1, 1, 0, {"proximal_mu": 0.01}))
    client_seconds = time.perf_counter() - t0
    params = sum(v.size for v in start.values())
    modules = len({module_of(k) for k in start})
    print(
        f"upload: {len(start)} arrays, {params:,} floats in {modules} modules; one client epoch on "
        f"{args.rows:,} rows: {client_seconds:.2f} s"
    )

    rows = []
    for k in args.scenarios:
        rng = np.random.default_rng(k)
        downloads = [start] * k
        uploads = [
            {key: (v + rng.normal(scale=1e-2, size=v.shape)).astype(v.dtype) for key, v in start.items()}
            for _ in range(k)
        ]
        timings = {}
        for label, coordinate in (("coordination+personalisation", True), ("personalisation only", False)):
            best = np.inf
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                personalized_aggregate(
                    downloads,
                    uploads,
                    module_of,
                    tau=1.0,
                    coordinate=coordinate,
                    rng=np.random.default_rng(0),
                )
                best = min(best, time.perf_counter() - t0)
            timings[label] = best
        server = timings["coordination+personalisation"]
        row = {
            "scenarios": k,
            "server_s": server,
            "server_personalisation_only_s": timings["personalisation only"],
            "client_epoch_s": client_seconds,
            "share_parallel_round": server / (server + client_seconds),
            "share_sequential_round": server / (server + k * client_seconds),
            "rows_per_scenario": args.rows,
            "upload_floats": int(params),
            "modules": modules,
        }
        rows.append(row)
        print(
            f"K={k:4d}: server {server:.3f} s (personalisation only {timings['personalisation only']:.3f} s); "
            f"share of a round: {100 * row['share_parallel_round']:.1f} % with parallel clients, "
            f"{100 * row['share_sequential_round']:.2f} % in the sequential simulator"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": args.threads, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
