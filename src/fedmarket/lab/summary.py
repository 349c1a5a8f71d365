"""Helpers shared by the comparison summaries (``scripts/compare_*.py``): per-seed market averages read from a
merged run folder, rounds trained, bytes uploaded (from the dict ``fedmarket.report.load_run`` returns),
paired per-seed differences between two rows, and first phases compared round by round. Where early stopping
stopped a run (`fedmarket.eval.convergence.stop_slopes`) is part of the product's report, below the lab.

A merged run folder (``fedmarket merge`` / ``fedmarket grid``) holds ``metrics.json`` and
``seeds/seed<N>.json``; each seed file's ``test`` maps market -> metric -> value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedmarket.eval.convergence import validation_scores


def per_seed_average(run_dir: str | Path, metric: str) -> dict[int, float]:
    """Seed -> unweighted mean of ``metric`` over the markets of that seed's test results."""
    out = {}
    for path in sorted((Path(run_dir) / "seeds").glob("seed*.json")):
        rec = json.loads(path.read_text())
        values = [v[metric] for v in rec["test"].values() if metric in v]
        if values:
            out[int(rec["seed"])] = float(np.mean(values))
    return out


def rounds_text(metrics: Mapping[str, Any]) -> str:
    """Rounds trained over the seeds: mean (range), how many seeds hit the round cap instead of a plateau, and
    the mean round at which a phased run left its first phase (pre-training / source phase)."""
    conv = metrics.get("convergence") or {}
    if not conv:
        return str(metrics["config"]["train"]["rounds"])
    runs = [c["rounds_run"] for c in conv.values()]
    text = f"{np.mean(runs):.0f} ({min(runs)}–{max(runs)})" if len(runs) > 1 else f"{runs[0]}"
    ends = [c["phase_ends"][0] for c in conv.values() if c.get("phase_ends")]
    if ends:
        text += f", phase 1 ended at {np.mean(ends):.0f}"
    capped = sum(c.get("converged_round") is None for c in conv.values())
    if capped:
        text += f", {capped} capped"
    return text


def upload_bytes(metrics: Mapping[str, Any], per_round: bool = False) -> float:
    """Mean over markets of the bytes each uploaded in the whole run (or per round it took part in)."""
    comm = metrics.get("communication") or {}
    if per_round:
        vals = [v["up_bytes"] / v["rounds"] if v.get("rounds") else 0.0 for v in comm.values()]
    else:
        vals = [float(v.get("up_bytes", 0)) for v in comm.values()]
    return float(np.mean(vals)) if vals else 0.0


def paired(a: Mapping[int, float], b: Mapping[int, float], scale: float = 1.0, digits: int = 4) -> str:
    """``a − b`` on the seeds both have: the mean difference, its 95 % interval from a paired t-test over
    seeds and the verdict (`fedmarket.eval.verdicts`: ``wins`` only when the interval excludes 0, else
    ``tie``; ``untested`` below 3 paired seeds, where no interval is printed)."""
    from fedmarket.eval.verdicts import paired_verdict

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return "no common seeds"
    v = paired_verdict({s: a[s] * scale for s in seeds}, {s: b[s] * scale for s in seeds}, "score")
    if v["low"] is None:
        return f"{v['mean']:+.{digits}f} ({v['n']} seed{'s' if v['n'] != 1 else ''}: untested)"
    return f"{v['mean']:+.{digits}f} [{v['low']:+.{digits}f}, {v['high']:+.{digits}f}] {v['verdict']}"


def find_rows(
    merged: Sequence[Path], dataset: str, rows: Sequence[tuple[str, str]]
) -> list[tuple[str, str, Path, dict[str, Any]]]:
    """(suffix, label, run folder, loaded run) for each row whose folder ``<dataset>_<suffix>`` one of the
    ``merged`` folders holds (the first that does), in the order of ``rows``."""
    from fedmarket.report import load_run

    found = []
    for suffix, label in rows:
        name = f"{dataset}_{suffix}"
        run_dir = next((d / name for d in merged if (d / name / "metrics.json").is_file()), None)
        if run_dir is not None:
            found.append((suffix, label, run_dir, load_run(run_dir)))
    return found


def finish_dataset(
    fig: Any, out: Path, stem: str, dataset: str, run_dirs: Sequence[Path], metrics: Sequence[str], unit: str
) -> list[str]:
    """Save a summary's figure as ``out/<stem>_<dataset>.png``, write the dataset's standard report under
    ``out/<dataset>/`` and return the markdown lines that link both."""
    import matplotlib.pyplot as plt

    from fedmarket.report import write_report

    fig.tight_layout()
    fig.savefig(
        out / f"{stem}_{dataset}.png", dpi=110, bbox_inches="tight"
    )  # long row labels must not clip the axis title
    plt.close(fig)
    write_report(list(run_dirs), out / dataset, metrics=tuple(metrics))
    return [
        f"![{dataset}]({stem}_{dataset}.png)",
        "",
        f"Per-{unit} plots and tables: [{dataset}/report.md]({dataset}/report.md)",
        "",
    ]


def first_phase_curve(rec: dict[str, Any], metric: str, max_round: int | None = None) -> dict[int, float]:
    """Validation score per round (mean of ``metric`` over markets) of a seed record's first phase: rounds up
    to its first recorded phase end, and at most ``max_round`` (the method's ``federated_rounds``: runs made
    before a first phase's maximum was recorded as its end); all rounds when neither is known."""
    ends = (rec.get("convergence") or {}).get("phase_ends") or []
    candidates = [int(e) for e in ends[:1]] + ([int(max_round)] if max_round else [])
    end = min(candidates) if candidates else None
    return {r: v for r, v in validation_scores(rec, metric).items() if end is None or r <= end}


def _federated_rounds(run_dir: Path) -> int | None:
    """``method.options.federated_rounds`` of a run folder's config.yaml (None when absent)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text()) or {}
    value = ((cfg.get("method") or {}).get("options") or {}).get("federated_rounds")
    return int(value) if value else None


def matched_rounds(
    run_a: str | Path, run_b: str | Path, metric: str, max_round: int | None = None
) -> list[dict[str, Any]]:
    """Two runs' first phases compared round by round (the same compute), per seed both have: the rounds
    both reached, in how many ``a`` was ahead, the mean difference a − b, and the difference at the last
    round both reached (at most ``max_round``; ``curve_a``/``curve_b``: the two curves over those rounds). Separates "trains faster per
    round" from "stopped later"."""
    rows = []
    limit = {run: _federated_rounds(Path(run)) for run in (run_a, run_b)}
    seeds_a = {p.name: p for p in (Path(run_a) / "seeds").glob("seed*.json")}
    for name in sorted(seeds_a):
        other = Path(run_b) / "seeds" / name
        if not other.is_file():
            continue
        rec_a, rec_b = json.loads(seeds_a[name].read_text()), json.loads(other.read_text())
        ca = first_phase_curve(rec_a, metric, limit[run_a])
        cb = first_phase_curve(rec_b, metric, limit[run_b])
        common = sorted(r for r in set(ca) & set(cb) if max_round is None or r <= max_round)
        if not common:
            continue
        diff = np.array([ca[r] - cb[r] for r in common])
        rows.append(
            {
                "seed": int(rec_a["seed"]),
                "rounds": len(common),
                "last_round": common[-1],
                "a_ahead": int((diff > 0).sum()),
                "mean_diff": float(diff.mean()),
                "last_diff": float(diff[-1]),
                "curve_a": {r: ca[r] for r in common},
                "curve_b": {r: cb[r] for r in common},
            }
        )
    return rows
