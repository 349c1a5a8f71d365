"""Paired verdicts between two runs (docs/protocol.md, "Verdicts").

Two runs of the same protocol on the same data are paired by training seed: the same seed means the same
initialisation stream and the same negatives, so the per-seed difference removes what the seeds share. With at
least ``MIN_SEEDS`` (3) paired seeds a paired t-test over seeds gives a 95 % interval of the mean difference
(``scipy.stats``); A **wins** only when the interval lies above 0 (below, for a lower-is-better metric), **loses**
when it lies on the other side, and is otherwise a **tie**. With fewer paired seeds there is no interval and
the verdict is ``untested`` (never a win).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from fedmarket.eval.metrics import average_over_markets, lower_is_better

MIN_SEEDS = 3
LEVEL = 0.95
AVERAGE = "average"


def per_seed_metric(run_dir: str | Path, metric: str) -> dict[str, dict[int, float]]:
    """``{market: {seed: value}}`` of one test metric from a run folder's ``seeds/seed<N>.json``, with the
    unweighted mean over markets under ``"average"`` (as ``metrics.json`` computes it)."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(Path(run_dir, "seeds").glob("seed*.json")):
        rec = json.loads(path.read_text())
        seed = int(rec["seed"])
        test = rec.get("test") or {}
        for market, metrics in test.items():
            if metric in metrics:
                out.setdefault(market, {})[seed] = float(metrics[metric])
        avg = average_over_markets({m: {metric: v[metric]} for m, v in test.items() if metric in v})
        if metric in avg:
            out.setdefault(AVERAGE, {})[seed] = float(avg[metric])
    return out


def paired_verdict(a: Mapping[int, float], b: Mapping[int, float], metric: str) -> dict[str, Any]:
    """A − B over the seeds both have: ``n``, ``mean``, the 95 % interval ``low``/``high`` (None with fewer
    than ``MIN_SEEDS`` paired seeds), ``p`` (two-sided paired t-test) and ``verdict`` for A: ``wins``,
    ``loses``, ``tie`` or ``untested``."""
    seeds = sorted(set(a) & set(b))
    diffs = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    diffs = diffs[~np.isnan(diffs)]
    n = len(diffs)
    out: dict[str, Any] = {"n": n, "mean": float(diffs.mean()) if n else float("nan")}
    if n < MIN_SEEDS:
        return {**out, "low": None, "high": None, "p": None, "verdict": "untested"}
    sd = float(diffs.std(ddof=1))
    if sd == 0.0:  # identical differences on every seed: the interval is the point itself
        low = high = out["mean"]
        p = 0.0 if out["mean"] != 0 else 1.0
    else:
        half = float(stats.t.ppf(0.5 + LEVEL / 2, n - 1)) * sd / np.sqrt(n)
        low, high = out["mean"] - half, out["mean"] + half
        p = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    better_if_positive = not lower_is_better(metric)
    if low > 0:
        verdict = "wins" if better_if_positive else "loses"
    elif high < 0:
        verdict = "loses" if better_if_positive else "wins"
    else:
        verdict = "tie"
    return {**out, "low": low, "high": high, "p": p, "verdict": verdict}


def format_verdict(v: Mapping[str, Any], digits: int = 4) -> str:
    """``+0.0123 [+0.0050, +0.0196] wins`` (or ``+0.0123, 1 seed: untested``)."""
    if v["n"] == 0:
        return "–"
    mean = f"{v['mean']:+.{digits}f}"
    if v["low"] is None:
        return f"{mean} ({v['n']} seed{'s' if v['n'] != 1 else ''}: untested)"
    return f"{mean} [{v['low']:+.{digits}f}, {v['high']:+.{digits}f}] {v['verdict']}"
