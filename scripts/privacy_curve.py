"""Privacy-utility curve: test AUC (average over markets) against ε for DP runs of FedAvg and FedMM.

    # one DP run per noise multiplier, sequentially, into OUT (plus the no-DP reference run):
    .venv/bin/python scripts/privacy_curve.py run configs/xmrec_fedavg_dp.yaml --sigmas 4 2 1 0.5 --out runs/privacy
    .venv/bin/python scripts/privacy_curve.py run configs/xmrec_fedavg.yaml --out runs/privacy
    # collect every run folder under OUT (and --reference run folders) into curve.csv and a PNG:
    .venv/bin/python scripts/privacy_curve.py plot --out runs/privacy --png docs/privacy_utility.png \
        --reference runs/demo/xmrec_fedavg-* runs/demo/xmrec_local-* runs/fedmm_final/xmrec_fedmm-*

ε is the run's final ε at its δ (``metrics.json["privacy"]``); runs without DP are drawn as dashed lines.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

from fedmarket.api import run_experiment
from fedmarket.config import load_config


def run(config: str, sigmas: list[float], out: Path) -> None:
    for sigma in sigmas or [None]:
        overrides = {"output_dir": str(out), "progress": False}
        if sigma is not None:
            overrides["privacy.noise_multiplier"] = float(sigma)
        cfg = load_config(config, overrides)
        if sigma is not None:
            cfg.name = f"{cfg.name}-sigma{sigma:g}"
        print("run", cfg.name, "->", run_experiment(cfg), flush=True)


def collect(out: Path, references: list[Path] = ()) -> pd.DataFrame:
    rows = []
    for metrics in [*sorted(out.glob("*/metrics.json")), *(r / "metrics.json" for r in references)]:
        m = json.loads(metrics.read_text())
        p = m.get("privacy") or {}
        rows.append(
            {
                "method": m["method"],
                "run": str(metrics.parent),
                "noise_multiplier": p.get("noise_multiplier"),
                "clip_norm": p.get("clip_norm"),
                "delta": p.get("delta"),
                "epsilon": p.get("epsilon", math.inf),
                "auc": m["average"].get("auc"),
                "auc_std": (m.get("average_std") or {}).get("auc", 0.0),
                "logloss": m["average"].get("logloss"),
                "seeds": len(m["seeds"]),
            }
        )
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, png: Path) -> None:
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, (method, group) in enumerate(df.groupby("method")):
        color = f"C{i}"
        dp = group[group["epsilon"].apply(math.isfinite)].sort_values("epsilon")
        if not dp.empty:
            ax.errorbar(
                dp["epsilon"],
                dp["auc"],
                yerr=dp["auc_std"],
                fmt="o-",
                capsize=3,
                color=color,
                label=f"{method} (DP)",
            )
        for eps, auc in zip(dp["epsilon"], dp["auc"], strict=True):
            ax.annotate(f"{auc:.3f}", (eps, auc), textcoords="offset points", xytext=(0, 5), fontsize=7)
        clear = group[~group["epsilon"].apply(math.isfinite)]
        if not clear.empty:
            ax.axhline(clear["auc"].mean(), color=color, ls="--", lw=1, label=f"{method} (no DP)")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([1, 2, 5, 10, 20, 50, 100]))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ε (client-level, δ = 1e-5, after the last round)")
    ax.set_ylabel("test AUC (mean over 8 markets)")
    seeds = sorted(set(df["seeds"]))
    ax.set_title(
        f"Privacy-utility, XMarket (8 markets), {'/'.join(map(str, seeds))} seed(s), ± std over seeds"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("config")
    r.add_argument("--sigmas", type=float, nargs="*", default=[])
    r.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("plot")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--reference", type=Path, nargs="*", default=[], help="extra run folders (no-DP runs)")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.config, args.sigmas, args.out)
    else:
        df = collect(args.out, args.reference)
        df.to_csv(args.out / "curve.csv", index=False)
        print(df.to_string(index=False))
        plot(df, args.png or args.out / "privacy_utility.png")


if __name__ == "__main__":
    main()
