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
from pathlib import Path

import numpy as np
import yaml

from fedmarket.config import load_config
from fedmarket.data.prepare import prepare_data
from fedmarket.errors import FedmarketError
from fedmarket.methods import get_method
from fedmarket.methods.s2ce import SoftTargets
from fedmarket.methods.seq_trainer import market_text_vectors


def rows(config: str, overrides: dict) -> list[str]:
    cfg = load_config(config, overrides)
    # the method's own options (its defaults included), as training parses them
    opts = get_method(cfg.method.name).parse_options(cfg.method.options)
    tau, top_k, lam, whiten = opts.tau, opts.top_k, opts.lam, opts.whiten
    masses = {}
    for name, split in prepare_data(cfg).splits.items():
        vectors = market_text_vectors(split, opts.text_encoder)
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
    group.add_argument("--jobs-file", help="a `fedmarket grid` jobs file: each job's config with its `set`")
    group.add_argument("--config", help="one config")
    args = parser.parse_args()
    if args.jobs_file and not Path(args.jobs_file).is_file():
        raise SystemExit(f"jobs file not found: {args.jobs_file}")
    jobs = (
        yaml.safe_load(Path(args.jobs_file).read_text())
        if args.jobs_file
        else [{"config": args.config, "set": {}}]
    )
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
