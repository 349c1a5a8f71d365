"""Summarise a PF-MSMTrec comparison: merged run folders (``fedmarket grid`` -> ``OUT/merged``) of one or
more multi-task datasets -> ``OUT/summary.md`` (one table per dataset: scenario-mean CTR / CTCVR AUC and
LogLoss, mean ± std over seeds, rounds trained, bytes per round; a per-scenario CTR AUC table; the
comparison's bar checked with paired per-seed differences) and ``OUT/pfmsmt_<dataset>.png`` (mean AUC per row
with std error bars), plus the standard per-dataset ``fedmarket report`` (per-scenario plots).

    python scripts/compare_pfmsmt.py runs/pfgrid/merged --out runs/pfmsmt_comparison
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedmarket.lab.summary import (  # noqa: E402
    find_rows,
    finish_dataset,
    paired,
    per_seed_average,
    rounds_text,
    upload_bytes,
)

ROWS = [  # (suffix of the config name, label)
    ("mtl_local", "Local MMoE"),
    ("mtl_fedavg", "FedAvg-MMoE"),
    ("mtl_fedavg_ft", "FedAvg-MMoE + local fine-tune"),
    ("mtl_fedprox", "FedProx-MMoE"),
    ("mtl_fedbn", "FedBN-MMoE"),
    ("mtl_fedper", "FedPer-MMoE (local towers)"),
    ("mtl_ditto", "Ditto-MMoE"),
    ("pfmsmt", "**PF-MSMTrec**"),
    ("pfmsmt_no-template", "PF-MSMTrec w/o parameter template"),
    ("pfmsmt_no-fedbn", "PF-MSMTrec w/o FedBN"),
    ("pfmsmt_no-conflict", "PF-MSMTrec w/o conflict coordination"),
    ("pfmsmt_no-personalize", "PF-MSMTrec w/o personalised aggregation"),
    ("pfmsmt_no-towers", "PF-MSMTrec w/o tower aggregation"),
    ("pfmsmt_ft", "PF-MSMTrec + local fine-tune (variant)"),
    ("mtl_centralized", "Centralized (pooled, NOT private)"),
]
METRICS = ("ctr_auc", "ctcvr_auc", "ctr_logloss", "ctcvr_logloss")


def summarise(merged: list[Path], dataset: str, out: Path) -> list[str]:
    found = find_rows(merged, dataset, ROWS)
    if not found:
        return []
    lines = [f"## {dataset}", ""]
    lines += [
        "| row | seeds | rounds trained (mean, range) | CTR AUC | CTCVR AUC | CTR LogLoss | CTCVR LogLoss | up KB / scenario / round |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for _, label, _, m in found:
        cells = [f"{m['average'][k]:.4f} ± {m['average_std'].get(k, 0.0):.4f}" for k in METRICS]
        up = "raw data" if not m.get("private", True) else f"{upload_bytes(m, per_round=True) / 1000:.1f}"
        lines.append(
            f"| {label} | {len(m['seeds'])} | {rounds_text(m)} | " + " | ".join(cells) + f" | {up} |"
        )
    lines.append("")
    markets = found[0][3]["markets"]
    lines += [
        "Test CTR AUC per scenario (mean over seeds):",
        "",
        "| row | " + " | ".join(markets) + " |",
        "|---|" + "---:|" * len(markets),
    ]
    for _, label, _, m in found:
        lines.append(
            f"| {label} | " + " | ".join(f"{m['per_market'][s]['ctr_auc']:.4f}" for s in markets) + " |"
        )
    lines.append("")
    by = {suffix: run_dir for suffix, _, run_dir, _ in found}
    checks = [
        ("pfmsmt", "mtl_fedavg_ft", "PF-MSMTrec − FedAvg + fine-tune"),
        ("pfmsmt", "mtl_centralized", "PF-MSMTrec − Centralized"),
        ("pfmsmt", "mtl_fedavg", "PF-MSMTrec − FedAvg"),
        ("pfmsmt", "mtl_local", "PF-MSMTrec − Local"),
        ("pfmsmt_ft", "mtl_fedavg_ft", "PF-MSMTrec + fine-tune − FedAvg + fine-tune"),
        ("pfmsmt_ft", "mtl_centralized", "PF-MSMTrec + fine-tune − Centralized"),
        ("mtl_fedavg_ft", "mtl_fedavg", "FedAvg + fine-tune − FedAvg"),
        ("mtl_local", "mtl_fedavg", "Local − FedAvg"),
    ]
    rows = []
    for a, b, text in checks:
        if a in by and b in by:
            cells = [paired(per_seed_average(by[a], k), per_seed_average(by[b], k)) for k in METRICS[:2]]
            rows.append(f"| {text} | {cells[0]} | {cells[1]} |")
    if rows:
        lines += [
            "Paired differences of the scenario-mean test AUC (same seed; mean ± std over seeds):",
            "",
            "| comparison | CTR AUC | CTCVR AUC |",
            "|---|---:|---:|",
            *rows,
            "",
        ]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(found) + 1.5))
    for ax, k in zip(axes, METRICS[:2], strict=True):
        y = np.arange(len(found))[::-1]
        means = [m["average"][k] for *_, m in found]
        stds = [m["average_std"].get(k, 0.0) for *_, m in found]
        ax.barh(
            y,
            means,
            xerr=stds,
            color=["#c44" if s.startswith("pfmsmt") and s[6:] in ("", "_ft") else "#48a" for s, *_ in found],
        )
        ax.set_yticks(y, [lab.replace("**", "") for _, lab, *_ in found] if k == "ctr_auc" else [])
        lo = min(means) - 2 * max(stds + [0.002])
        ax.set_xlim(lo, max(means) + 2 * max(stds + [0.002]))
        ax.set_title(
            f"{dataset}: test {k.replace('_', ' ').upper()} (scenario mean, ±std over seeds)", fontsize=9
        )
    return lines + finish_dataset(fig, out, "pfmsmt", dataset, [d for *_, d, _ in found], METRICS, "scenario")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("merged", nargs="+", help="folders holding merged run folders named <dataset>_<row>")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=[
            "ml1m-proxy-age",
            "ml1m-proxy-zip",
            "synthetic-mtl-lowconflict",
            "synthetic-mtl-highconflict",
        ],
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# PF-MSMTrec comparison",
        "",
        "ML-1M rows are on the labelled **ML-1M multi-task PROXY** (not AliExpress). Test metrics of each",
        "scenario's best validation round; scenario means; mean ± std over seeds.",
        "",
    ]
    for dataset in args.datasets:
        lines += summarise([Path(m) for m in args.merged], dataset, out)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(out / "summary.md")


if __name__ == "__main__":
    main()
