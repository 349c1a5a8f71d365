"""FedMM performance items, on real XMarket data.

1. Upload per market per round: FedMM (RQ-VAE rounds: level-1 codebook + usage counts; CTR rounds: the c1
   code table + dense layers) versus FedAvg over the whole CTR model (every parameter, ID tables
   included), and versus FedAvg over the dense layers only. Reported as bytes and ratios, per market.
2. RQ-VAE code assignment (encoder + both quantization levels) for every item of the largest market.
   Target: < 1 s.
3. Optionally (``--runs DIR...``): wall time of the comparison, summed from the run folders' metrics.json.

    .venv/bin/python benchmarks/fedmm_perf.py [--threads 1] [--matmul auto] [--runs runs/fedmm_cmp/*/]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fedmarket.config import MATMUL_CHOICES, config_from_dict
from fedmarket.data.prepare import prepare_data
from fedmarket.federation.payload import payload_bytes
from fedmarket.matmul import configure_torch
from fedmarket.methods import get_method
from fedmarket.methods.ctr_baselines import DENSE_UPLOAD, ctr_client_kwargs
from fedmarket.methods.fedmm import FedMMClient, Schedule, upload_declaration


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--matmul", default="auto", choices=MATMUL_CHOICES, help="fp32 matmul kernels, as train.matmul"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--config", default="configs/xmrec_fedmm.yaml")
    ap.add_argument("--runs", nargs="*", default=[])
    ap.add_argument("--out", default="benchmarks/results/fedmm_perf.json")
    args = ap.parse_args()
    kernels = configure_torch(args.threads, args.matmul)
    import yaml

    raw = yaml.safe_load(Path(args.config).read_text())
    raw["progress"] = False
    cfg = config_from_dict(raw)
    opts = get_method("fedmm").parse_options(cfg.method.options)
    data = prepare_data(cfg)
    schedule = Schedule.from_options(opts, cfg.train.rounds)
    kwargs = ctr_client_kwargs(cfg, 0)
    declaration = upload_declaration(opts)
    result: dict = {
        "config": args.config,
        "threads": args.threads,
        "matmul": args.matmul,
        "matmul_kernels": kernels,
        "upload_declaration": list(declaration.patterns),
    }
    per_market = {}
    for name, split in data.splits.items():
        client = FedMMClient(split, opts, schedule, kwargs, cfg.model.use_side_features)
        init = client.initial_payload()
        rq = payload_bytes({k: v for k, v in init.items() if k.startswith("rqvae.")})
        ctr = payload_bytes({k: v for k, v in init.items() if k.startswith("ctr.")})
        embed = payload_bytes({k: v for k, v in init.items() if k.startswith("embed.")})
        # FedAvg references over the plain CTR model of this market (no code fields)
        from fedmarket.methods.ctr_trainer import CTRClient, CTRData

        plain = CTRClient(
            name, CTRData.from_split(split, cfg.model.use_side_features), DENSE_UPLOAD, **kwargs
        )
        whole = sum(t.numel() * t.element_size() for t in plain.model.state_dict().values())
        dense = payload_bytes(plain.upload())
        per_market[name] = {
            "fedmm_rqvae_round_bytes": rq,
            "fedmm_ctr_round_bytes": ctr,
            "fedmm_embed_round_bytes": embed,
            "fedavg_whole_model_bytes": whole,
            "fedavg_dense_bytes": dense,
            "ratio_fedmm_ctr_round_vs_whole_model": ctr / whole,
            "ratio_fedmm_rqvae_round_vs_whole_model": rq / whole,
            "ratio_fedmm_ctr_round_vs_dense": ctr / dense,
        }
    result["upload_per_round"] = per_market

    # code assignment for every item of the largest market
    largest = max(data.splits, key=lambda n: data.splits[n].market.num_items)
    client = FedMMClient(data.splits[largest], opts, schedule, kwargs, cfg.model.use_side_features)
    client.item_embeddings = (
        np.random.default_rng(0)
        .standard_normal((data.splits[largest].market.num_items, opts.embedding_dim))
        .astype(np.float32)
    )
    if opts.embedding == "fedctr":
        client.item_embeddings = client.item_embeddings[:, : client.embed_ctr.model.embed_dim]
    client.item_input = client._build_item_input()
    client.rqvae.init_codebooks(client.item_input, seed=0)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        client.assign_codes()
        times.append(time.perf_counter() - t0)
    result["code_assignment"] = {
        "market": largest,
        "items": int(data.splits[largest].market.num_items),
        "global_codes": opts.global_codes,
        "local_codes": opts.local_codes,
        "seconds_median": float(np.median(times)),
        "target_seconds": 1.0,
    }

    if args.runs:
        seconds = {}
        for run in args.runs:
            # per-seed training time (seeds may have been added to a run folder later, with resume)
            metrics = json.loads((Path(run) / "metrics.json").read_text())
            per_seed = [
                json.loads(p.read_text())["seconds"] for p in sorted((Path(run) / "seeds").glob("seed*.json"))
            ]
            seconds[f"{metrics['name']} ({len(per_seed)} seeds)"] = sum(per_seed)
        result["comparison_wall_seconds"] = {"per_run": seconds, "total": sum(seconds.values())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
