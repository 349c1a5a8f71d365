"""Early stopping, read back from a run folder: the validation score per round of a seed record
(`validation_scores`) and where ``train.patience`` stopped each seed, with the score's slope there
(`stop_slopes`: a plateau, or a stop on noise while the score still rose). `fedmarket.report` and
``fedmarket status`` show them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def validation_scores(rec: dict[str, Any], metric: str) -> dict[int, float]:
    """Validation score per round of a seed record (``seeds/seed<N>.json``): the mean of ``metric`` over the
    markets evaluated that round, in round order."""
    by_round: dict[int, list[float]] = {}
    for h in rec.get("history", []):
        if h.get("split") == "valid" and h.get(metric) is not None:
            by_round.setdefault(int(h["round"]), []).append(float(h[metric]))
    return {r: float(np.nanmean(v)) for r, v in sorted(by_round.items())}


def stop_slopes(run_dir: str | Path, metric: str, window: int = 20) -> list[dict[str, Any]]:
    """Where early stopping (``train.patience``) stopped each seed of a run, and whether that was a plateau.

    One row per stop (a phase end, then the run's convergence): the round, the validation score there (mean of
    ``metric`` over the markets) and the slope of that score per round, a least-squares line over the last
    ``window`` evaluated rounds of the same phase (its second half when shorter, to leave out its first
    rise). A patience rule can fire on noise while the score still rises: a clearly positive slope says the
    stop was not a plateau. Runs without early stopping give no rows."""
    rows = []
    for path in sorted((Path(run_dir) / "seeds").glob("seed*.json")):
        rec = json.loads(path.read_text())
        conv = rec.get("convergence") or {}
        stops = [(r, "phase end") for r in conv.get("phase_ends") or []]
        if conv.get("converged_round") is not None:
            stops.append((conv["converged_round"], "converged"))
        score = validation_scores(rec, metric)
        start = 0
        for stop, kind in stops:
            phase = [r for r in sorted(score) if start < r <= stop]
            xs = phase[-min(window, max(3, len(phase) // 2)) :]  # past the phase's first rise
            slope = float(np.polyfit(xs, [score[r] for r in xs], 1)[0]) if len(xs) >= 3 else float("nan")
            rows.append(
                {
                    "seed": int(rec["seed"]),
                    "round": int(stop),
                    "kind": kind,
                    "score": score.get(stop, float("nan")),
                    "slope": slope,
                    "rounds_fitted": len(xs),
                }
            )
            start = stop
    return rows
