"""The whole FedMM comparison in one command: every row's config, N seeds, at most ``--jobs``
experiment processes at once, then one combined report (tables + AUC-per-market and AUC-vs-bytes plots),
the code-alignment diagnostic of every FedMM run (analysis only), and a summary table.

    .venv/bin/python scripts/compare_fedmm.py --seeds 3 --jobs 2 --out runs/fedmm_comparison
    .venv/bin/python scripts/compare_fedmm.py --models deepfm --seeds 1 --rows local fedmm   # a subset
    .venv/bin/python scripts/compare_fedmm.py --rows --reuse RUN_DIR...   # report on finished runs only

Each row's seeds run as single-seed processes of the lab's job pool (`fedmarket.lab.grid`, = ``fedmarket grid``:
``OUT/runs/seed<N>/`` per seed, ``OUT/runs/merged/<name>`` per row); a second comparison into the same ``--out``
merges with the first one's seeds, so give it a new ``--out``. Equivalent single-process form (no alignment, no
summary): ``fedmarket compare CONFIG... --seeds 3``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROWS = [
    "local",
    "fedavg",
    "centralized",
    "central_shared_ids",
    "fedmm_localcb",
    "fedmm_globalonly",
    "fedmm_naive",
    "fedmm_fedctr",
    "fedmm_stats",
    "fedmm_fedae",
    "fedmm_statsfedae",
    "fedmm_statsonly",
    "fedmm_statsonly_localcb",
    "fedmm_calonly",
    "fedmm_calonly_localcb",
    "fedmm_calmf",
    "fedmm_lightgcn",
    "fedmm_lightgcn_statsfedae",
    "fedmm",
]


def config_path(row: str, model: str) -> Path:
    return Path("configs") / (f"xmrec_{row}.yaml" if model == "deepfm" else f"xmrec_{row}_{model}.yaml")


def run_all(paths: list[Path], seeds: int, jobs: int, out: Path, threads: int) -> list[Path]:
    """Every config × seeds 0..N-1 as single-seed processes, ``jobs`` at a time (`fedmarket.lab.grid`: per-seed
    folders in ``out/runs/seed<N>``, FedMM's alignment diagnostic, merged folders in ``out/runs/merged``);
    returns each config's merged run folder, in the order of ``paths`` (those that finished)."""
    from fedmarket.config import load_config
    from fedmarket.lab.grid import run_grid

    if not paths:
        return []
    result = run_grid(
        [str(p) for p in paths], list(range(seeds)), out=out / "runs", parallel=jobs, threads=threads
    )
    if result.failed:
        print(f"FAILED (left out): {result.failed} (logs in {out / 'runs' / 'logs'})", flush=True)
    merged = {folder.name: folder for folder in result.merged}
    names = [load_config(p).name for p in paths]
    return [merged[n] for n in names if n in merged]


def summary_markdown(run_dirs: list[Path]) -> str:
    """Per-market AUC, average AUC/LogLoss/gAUC (mean ± std), bytes up per market per round, alignment."""
    from fedmarket.report import comparison_table, load_run, markdown_table

    runs = [load_run(d) for d in run_dirs]
    auc = comparison_table(runs, "auc", formatted=True)
    lines = ["### AUC per market (test, 1+99 candidates, mean ± std over seeds)", "", markdown_table(auc), ""]
    rows = []
    for label, run, folder in zip(auc.index, runs, run_dirs, strict=True):
        comm = run["communication"].values()
        up = [c["up_bytes"] / c["rounds"] for c in comm if c.get("rounds")]
        align = folder / "alignment.json"
        a = json.loads(align.read_text()) if align.exists() else {}
        avg, std = run["average"], run["average_std"]
        single_seed = len(run.get("seeds", [])) < 2

        def cell(metric: str, avg=avg, std=std, single=single_seed) -> str:
            mean = f"{avg.get(metric, float('nan')):.4f}"
            return mean if single else f"{mean} ± {std.get(metric, float('nan')):.4f}"

        rows.append(
            {
                "run": label,
                "seeds": len(run.get("seeds", [])),
                "AUC": cell("auc"),
                "LogLoss": cell("logloss"),
                "gAUC": cell("gauc"),
                "up KB/round/market": f"{sum(up) / len(up) / 1e3:.1f}"
                if up and run.get("private", True)
                else "raw data",
                "same c1 (shared ASIN)": f"{a['same_code']:.3f}" if "same_code" in a else "",
                "chance": f"{a['chance']:.3f}" if "chance" in a else "",
            }
        )
    import pandas as pd

    lines += [
        "### Averages over markets, bytes and code alignment",
        "",
        markdown_table(pd.DataFrame(rows), index=False),
        "",
    ]
    return "\n".join(lines)


SMALL_MARKETS = ("in", "jp", "de")


def gap_table(run_dirs: list[Path], markets=SMALL_MARKETS) -> str:
    """Share of the Local -> Central-shared-IDs AUC gap that each row closes on the small markets, per CTR
    model (100 % = the not-private ceiling; negative = worse than Local). Mean AUC over seeds."""
    import pandas as pd

    from fedmarket.report import markdown_table

    metrics = [json.loads((d / "metrics.json").read_text()) for d in run_dirs]
    ref: dict[tuple[str, str], dict] = {}
    for m in metrics:
        if m["method"] in ("local", "central_shared_ids"):
            ref[(m["model"], m["method"])] = m["per_market"]
    rows = []
    for m in metrics:
        local, csi = ref.get((m["model"], "local")), ref.get((m["model"], "central_shared_ids"))
        if not local or not csi or m["method"] in ("local", "central_shared_ids"):
            continue
        row = {"run": m["name"], "model": m["model"]}
        for mk in markets:
            gap = csi[mk]["auc"] - local[mk]["auc"]
            row[mk] = f"{100 * (m['per_market'][mk]['auc'] - local[mk]['auc']) / gap:.0f} %" if gap else ""
        rows.append(row)
    return markdown_table(pd.DataFrame(rows), index=False) if rows else ""


def seed_table(run_dirs: list[Path], seed: int) -> str:
    """AUC per market of one seed of each run (to compare 1-seed rows with the same seed of 3-seed rows)."""
    import pandas as pd

    from fedmarket.report import markdown_table

    rows = []
    for folder in run_dirs:
        metrics = json.loads((folder / "metrics.json").read_text())
        record = json.loads((folder / "seeds" / f"seed{seed}.json").read_text())
        test = record["test"]
        markets = [m for m in metrics["markets"] if m in test] or list(test)
        row = {"run": metrics["name"]}
        row.update({m: f"{test[m]['auc']:.4f}" for m in markets})
        row["average"] = f"{sum(test[m]['auc'] for m in markets) / len(markets):.4f}"
        align = folder / "alignment.json"
        if align.exists():
            a = json.loads(align.read_text())["seeds"].get(f"seed{seed}")
            if a:
                row["same c1 / chance"] = f"{a['same_code']:.3f} / {a['chance']:.3f}"
        rows.append(row)
    return markdown_table(pd.DataFrame(rows).fillna(""), index=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=["deepfm", "dcnv2"])
    ap.add_argument("--rows", nargs="*", default=ROWS, help="rows to run (none: only --reuse)")
    ap.add_argument("--out", default="runs/fedmm_comparison")
    ap.add_argument("--seed-table", type=int, help="also print the AUC table of this one seed of every run")
    ap.add_argument(
        "--reuse", nargs="*", default=[], help="finished run folders to include instead of re-running"
    )
    args = ap.parse_args()
    out = Path(args.out)
    paths = [config_path(r, m) for m in args.models for r in args.rows if config_path(r, m).exists()]
    started = time.perf_counter()
    run_dirs = [Path(p) for p in args.reuse] + run_all(paths, args.seeds, args.jobs, out, args.threads)
    wall = time.perf_counter() - started

    from fedmarket.methods.fedmm import alignment_from_run
    from fedmarket.report import write_report

    for folder in run_dirs:
        is_fedmm = json.loads((folder / "metrics.json").read_text())["method"] == "fedmm"
        if is_fedmm and (folder / "checkpoints").exists():  # merged grids carry alignment.json already
            alignment_from_run(folder)
    report = write_report(run_dirs, out, title="FedMM comparison on XMarket (8 markets)")
    summary = summary_markdown(run_dirs)
    gaps = gap_table(run_dirs)
    if gaps:
        summary += (
            "\n### Share of the Local -> Central-shared-IDs AUC gap closed on the small markets\n\n"
            + gaps
            + "\n"
        )
    (out / "summary.md").write_text(
        f"{summary}\nwall time of this comparison: {wall:.0f} s ({args.jobs} jobs)\n"
    )
    if args.seed_table is not None:
        table = seed_table(run_dirs, args.seed_table)
        (out / f"seed{args.seed_table}.md").write_text(table + "\n")
        print(table)
    print(summary)
    print(f"report: {report}\nwall time: {wall:.0f} s")


if __name__ == "__main__":
    main()
