"""How much of S²CE's target stays on the true item, per market, for each setting of a sweep file (or one
config): q(target) of the soft target (mean over the market's items as targets) and the mixed target's
(1 − λ) + λ·q(target). 1 is CE; the defaults (τ 0.1, top-k 50, λ 0.5) keep about 0.7 on MovieLens. Uses the
framework's own data loading and (cached) text vectors, so it reads exactly what training reads.

    HF_HUB_OFFLINE=1 python scripts/s2ce_target_mass.py --jobs-file scripts/grids/fecosr_s2ce_sweep_2core.yaml
    HF_HUB_OFFLINE=1 python scripts/s2ce_target_mass.py --config configs/movielens-age_fecosr.yaml
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import yaml

from fedmarket.api import prepare_data
from fedmarket.config import load_config
from fedmarket.errors import FedmarketError
from fedmarket.methods.s2ce import SoftTargets
from fedmarket.methods.seq_trainer import market_text_vectors


def rows(config: str, overrides: dict) -> list[str]:
    cfg = load_config(config, overrides)
    opts = cfg.method.options
    tau, top_k, lam, whiten = (
        opts.get("tau", 0.1),
        opts.get("top_k", 0),
        opts.get("lam", 0.5),
        opts.get("whiten", False),
    )
    splits = prepare_data(cfg).splits
    masses = {}
    for name, split in splits.items():
        vectors = market_text_vectors(split, opts.get("text_encoder", "minilm"))
        masses[name] = SoftTargets.build(vectors, tau, top_k, whiten).target_mass()
    q = float(np.mean(list(masses.values())))
    per_market = ", ".join(f"{n} {v:.3f}" for n, v in masses.items())
    return [
        f"| {overrides.get('name', cfg.name)} | τ {tau}, top-k {top_k}, λ {lam}, whiten {whiten} | {q:.3f} | "
        f"{(1 - lam) + lam * q:.3f} | {per_market} |"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--jobs-file", help="a run_grid jobs file: each job's config with its `set`")
    group.add_argument("--config", help="one config")
    args = parser.parse_args()
    jobs = yaml.safe_load(open(args.jobs_file)) if args.jobs_file else [{"config": args.config, "set": {}}]
    if not isinstance(jobs, list) or not all(isinstance(j, dict) and "config" in j for j in jobs):
        raise SystemExit(f"{args.jobs_file}: expected a list of {{config, seeds, set}} entries")
    lines = [
        "| run | setting | q(target), market mean | mixed target on the true item | per market |",
        "|---|---|---:|---:|---|",
    ]
    try:
        for job in jobs:
            lines += rows(job["config"], job.get("set") or {})
    except FedmarketError as exc:
        raise SystemExit(str(exc)) from None
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
