"""Compare S²CE settings at matched compute: each sweep run (FedAvg-S²CE, no fine-tuning, a fixed number of
rounds) against FedAvg-CE and against the default S²CE setting, round by round on validation NDCG@10 (1+99,
mean over markets), seed by seed. The references may be longer runs: only the rounds both reached count, and
only their first phase (pre-training). Writes a markdown table and a plot of the curves.

    python scripts/compare_s2ce_sweep.py runs/s2ce_sweep/merged \\
        --ce runs/mlage_pt/merged/movielens-age_seq_fedavg_ft_long-pt \\
        --default runs/mlage_pt/merged/movielens-age_fecosr_long-pt --max-round 40 \\
        --out runs/s2ce_sweep/summary.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from fedmarket.lab.summary import matched_rounds  # noqa: E402

OPTIONS = ("tau", "top_k", "lam", "whiten")


def setting(run_dir: Path) -> str:
    """The S²CE options of a run folder's config.yaml, e.g. ``tau 0.1, top_k 50, lam 0.5, whiten False``."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no config.yaml (not a run folder)")
    options = (yaml.safe_load(path.read_text()).get("method") or {}).get("options") or {}
    return ", ".join(f"{k} {options[k]}" for k in OPTIONS if k in options) or "?"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", help="folder of merged sweep run folders")
    parser.add_argument("--ce", required=True, help="run folder of FedAvg-CE (its first phase counts)")
    parser.add_argument("--default", help="run folder of FedAvg-S²CE at the default setting")
    parser.add_argument("--metric", default="ndcg@10")
    parser.add_argument(
        "--max-round", type=int, help="compare rounds up to this one only (the sweep's budget, e.g. 40)"
    )
    parser.add_argument("--out", required=True, help="markdown file to write (a .png beside it)")
    args = parser.parse_args()
    sweep = Path(args.sweep)
    refs = {"CE": Path(args.ce), **({"default S²CE": Path(args.default)} if args.default else {})}
    for path in [sweep, *refs.values()]:
        if not path.is_dir():
            raise SystemExit(f"not a folder: {path}")
    runs = sorted(p for p in sweep.iterdir() if (p / "seeds").is_dir())
    if not runs:
        raise SystemExit(f"{sweep}: no run folders (with seeds/) in it")
    if args.default:
        runs = [refs["default S²CE"], *runs]
    lines = [
        f"# S²CE settings at matched rounds ({args.metric}, validation, ×10⁻³)",
        "",
        "Each setting's FedAvg-S²CE pre-training against the references over every round both reached (same "
        "compute): in how many rounds it is ahead, the mean difference, and the difference at the last common "
        "round.",
        "",
        "| run | setting | seed | rounds | ahead of CE | − CE mean | − CE last |"
        + (" ahead of default | − default mean |" if args.default else ""),
        "|---|---|---:|---|---:|---:|---:|" + ("---:|---:|" if args.default else ""),
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted_ce = False
    for i, run in enumerate(runs):
        vs_ce = matched_rounds(run, refs["CE"], args.metric, args.max_round)
        vs_default = (
            {r["seed"]: r for r in matched_rounds(run, refs["default S²CE"], args.metric, args.max_round)}
            if args.default and run != refs["default S²CE"]
            else {}
        )
        for r in vs_ce:
            cells = (
                f"| {run.name} | {setting(run)} | {r['seed']} | 1–{r['last_round']} | "
                f"{r['a_ahead']} of {r['rounds']} | {1000 * r['mean_diff']:+.1f} | {1000 * r['last_diff']:+.1f} |"
            )
            if args.default:
                d = vs_default.get(r["seed"])
                cells += (
                    f" {d['a_ahead']} of {d['rounds']} | {1000 * d['mean_diff']:+.1f} |" if d else " – | – |"
                )
            lines.append(cells)
            if r["seed"] == vs_ce[0]["seed"]:
                ax.plot(
                    list(r["curve_a"]), list(r["curve_a"].values()), color=f"C{i}", lw=1, label=setting(run)
                )
                if not plotted_ce:
                    ax.plot(
                        list(r["curve_b"]), list(r["curve_b"].values()), "k--", lw=1.5, label="CE", zorder=5
                    )
                    plotted_ce = True
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ax.set_xlabel("pre-training round (FedAvg)")
    ax.set_ylabel(f"validation {args.metric}, market mean")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    lines += ["", f"![curves]({out.with_suffix('.png').name})", ""]
    out.write_text("\n".join(lines) + "\n")
    print(out)


if __name__ == "__main__":
    main()
