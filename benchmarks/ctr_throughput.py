"""CTR performance on real XMarket data, as ratios against references measured in the same run.

1. Local training throughput (samples/s) of fedmarket's CTR trainer (per-epoch negative sampling, index
   gathers, BCE, Adam) versus a minimal hand-written PyTorch loop over pre-built tensors of the same
   instances with the same model, batch size and optimiser. Target: ratio >= 0.8.
2. Full-catalog ranking of every test user of the largest markets (ca: 4,668 users x 5,735 items;
   es: 6,218 x 3,467): wall time of `full_ranking_metrics` over `score_matrix`. Target: < 2 s.

    .venv/bin/python benchmarks/ctr_throughput.py [--market ca] [--repeats 3] [--threads 1] [--matmul auto]

``--matmul`` picks the fp32 matmul kernels for both sides, as ``train.matmul`` does for a run (`fedmarket.matmul`;
runs default to "auto"; "blas" = PyTorch's default, with which the README's first table was measured).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedmarket.config import MATMUL_CHOICES, config_from_dict
from fedmarket.data import leave_one_out, load_dataset
from fedmarket.eval.metrics import full_ranking_metrics
from fedmarket.matmul import use_matmul
from fedmarket.methods.ctr_baselines import DENSE_UPLOAD, ctr_client_kwargs
from fedmarket.methods.ctr_trainer import CTRClient, CTRData


def hand_written_epoch(model, opt, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    model.train()
    for s in range(0, len(x), batch_size):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(x[s : s + batch_size]), y[s : s + batch_size]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--market", default="ca")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="deepfm")
    ap.add_argument("--matmul", default="auto", choices=MATMUL_CHOICES)
    ap.add_argument("--out", default="benchmarks/results/ctr_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    matmul = use_matmul(args.matmul)
    cfg = config_from_dict({"model": {"name": args.model}, "progress": False})
    markets = load_dataset("xmrec", markets=[args.market, "es"] if args.market != "es" else ["es"])
    split = leave_one_out(markets[args.market])
    client = CTRClient(args.market, CTRData.from_split(split), DENSE_UPLOAD, **ctr_client_kwargs(cfg, 0))

    # reference: the same instances, pre-gathered into one tensor, a bare loop
    users, items, labels = client.epoch_instances(0, 1, 0)
    x_ref = client.batch_x(torch.from_numpy(users), torch.from_numpy(items))
    y_ref = torch.from_numpy(labels)
    ref_model = CTRClient(args.market, client.data, DENSE_UPLOAD, **ctr_client_kwargs(cfg, 0)).model
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=cfg.train.lr)
    n = len(users)
    ours, ref = [], []
    for r in range(args.repeats):  # alternate so machine noise hits both alike
        t = time.perf_counter()
        client.train_epoch(0, 1, r, {}, 0.0)
        ours.append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        hand_written_epoch(ref_model, ref_opt, x_ref, y_ref, cfg.train.batch_size)
        ref.append(n / (time.perf_counter() - t))
    result = {
        "market": args.market,
        "model": args.model,
        "threads": args.threads,
        "matmul": args.matmul,
        "matmul_kernels": matmul,
        "instances_per_epoch": n,
        "fedmarket_samples_per_s": float(np.median(ours)),
        "hand_written_samples_per_s": float(np.median(ref)),
        "throughput_ratio": float(np.median(ours) / np.median(ref)),
    }

    # full-catalog ranking of every test user
    for name, mk in markets.items():
        sp = split if name == args.market else leave_one_out(mk)
        c = (
            client
            if name == args.market
            else CTRClient(name, CTRData.from_split(sp), DENSE_UPLOAD, **ctr_client_kwargs(cfg, 0))
        )
        c.model.eval()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            full_ranking_metrics(
                lambda chunk, c=c: c.model.score_matrix(
                    c.data.user_x[torch.from_numpy(chunk)], c.data.item_x
                ),
                sp.test.users,
                sp.test.positives,
                sp.seen_for("test"),
            )
            times.append(time.perf_counter() - t)
        result[f"full_ranking_seconds_{name}"] = float(np.median(times))
        # the ranking machinery alone (rank counting over the catalog, exclusions), with a factorised
        # dot-product scorer of the same size: what any MF/two-tower model pays
        u_vec = torch.randn(len(c.data.user_x), 32)
        i_vec = torch.randn(len(c.data.item_x), 32)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            full_ranking_metrics(
                lambda chunk, u_vec=u_vec, i_vec=i_vec: u_vec[torch.from_numpy(chunk)] @ i_vec.T,
                sp.test.users,
                sp.test.positives,
                sp.seen_for("test"),
            )
            times.append(time.perf_counter() - t)
        result[f"full_ranking_seconds_dot_scorer_{name}"] = float(np.median(times))
        result[f"full_ranking_pairs_{name}"] = int(len(sp.test.users) * mk.num_items)
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
