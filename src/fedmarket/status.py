"""Where runs stand: ``fedmarket status RUN_DIR|ROOT...``.

A run trains for hours; its folder already says how far it got. For each seed of each run folder (a folder with a
``config.yaml``; a root is searched for them): ``done`` (``seeds/seed<N>.json``: rounds run, selected round, the
headline test metric), ``running`` / ``stalled`` (``checkpoints/seed<N>.ckpt``, written after every round: the
round reached, the phase, the latest and best validation score, the slope the ``train.stop_slope`` guard reads,
and how long ago the checkpoint was written; ``stalled`` when longer than ``stale_after`` seconds — a killed job
that ``--resume`` continues) or ``pending``. Reads only; works the same on in-process and Flower checkpoints.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedmarket.errors import FedmarketError
from fedmarket.eval.convergence import validation_scores
from fedmarket.federation.runtime import Plateau

# a run's headline test metrics, in order: AUC for CTR runs, CTR/CTCVR AUC for multi-task ones, NDCG@10 for
# sequences (full ranking first)
HEADLINE = ("auc", "ctr_auc", "ctcvr_auc", "full_ndcg@10", "ndcg@10")


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders (holding ``config.yaml``) among ``paths``, each a run folder or a root searched below it."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FedmarketError(f"{p} does not exist")
        if (p / "config.yaml").is_file():
            found.append(p)
            continue
        below = sorted(c.parent for c in p.rglob("config.yaml"))
        if not below:
            raise FedmarketError(f"{p} holds no run folder (no config.yaml in it or below it)")
        found.extend(below)
    return found


def without_merged_copies(dirs: Sequence[Path]) -> list[Path]:
    """``dirs`` less each ``merged/<name>`` folder whose per-seed folders (a config of the same name, in
    ``fedmarket grid``'s ``OUT/seed<N>/`` layout) are listed too, so that every seed shows once."""

    def name(d: Path) -> str | None:
        try:
            return (yaml.safe_load((d / "config.yaml").read_text()) or {}).get("name")
        except (OSError, yaml.YAMLError, AttributeError):
            return None

    per_seed = {name(d) for d in dirs if d.parent.name != "merged"}
    return [d for d in dirs if d.parent.name != "merged" or name(d) not in per_seed]


def seed_status(
    run_dir: Path, seed: int, cfg: dict[str, Any], now: float | None = None, stale_after: float = 1800.0
) -> dict[str, Any]:
    """One seed's state in ``run_dir`` (see the module doc); ``cfg`` is the folder's config.yaml as a dict."""
    now = time.time() if now is None else now
    train, ev = cfg.get("train") or {}, cfg.get("eval") or {}
    metric = ev.get("select_metric", "auc")
    max_rounds = int(train.get("rounds", 0))
    row: dict[str, Any] = {"run": run_dir.name, "seed": seed, "max_rounds": max_rounds, "metric": metric}
    seed_file = run_dir / "seeds" / f"seed{seed}.json"
    if seed_file.is_file():
        rec = json.loads(seed_file.read_text())
        conv = rec.get("convergence") or {}
        scores = validation_scores(rec, metric)
        row.update(
            state="done",
            round=conv.get("rounds_run", max(scores) if scores else None),
            phase_ends=list(conv.get("phase_ends") or []),
            selected_round=rec.get("selected_round"),
            seconds=rec.get("seconds"),
        )
        test = rec.get("test") or {}
        for name in HEADLINE:
            values = [v[name] for v in test.values() if isinstance(v, dict) and name in v]
            if values:
                row["test"] = (name, float(np.mean(values)))
                break
        return row
    ckpt = run_dir / "checkpoints" / f"seed{seed}.ckpt"
    if not ckpt.is_file():
        row["state"] = "pending"
        return row
    from fedmarket.checkpoint import load_state

    try:
        state = load_state(ckpt)
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file is reported, not raised
        row.update(state="unreadable", error=f"{type(exc).__name__}: {exc}")
        return row
    age = now - ckpt.stat().st_mtime
    scores = validation_scores({"history": state.get("history", [])}, metric)
    plateau = Plateau(select_metric=metric, slope_window=int(train.get("slope_window", 20)))
    plateau.load_state_dict(state.get("plateau"))  # the guard's own slope over the current phase
    best_round = max(scores, key=scores.get) if scores else None
    row.update(
        state="stalled" if age > stale_after else "running",
        round=int(state.get("round", 0)),
        phase_ends=list(plateau.phase_ends),
        latest=scores[max(scores)] if scores else None,
        best=(best_round, scores[best_round]) if scores else None,
        since_best=plateau.since,
        slope=plateau.slope(),
        checkpoint_age=age,
    )
    return row


def run_status(
    run_dir: str | Path, now: float | None = None, stale_after: float = 1800.0
) -> list[dict[str, Any]]:
    """``seed_status`` for every seed the folder's config names (and any other seed it holds files for)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FedmarketError(f"{run_dir} is not a run folder: {path} is missing")
    cfg = yaml.safe_load(path.read_text()) or {}
    seeds = {int(s) for s in cfg.get("seeds") or [0]}
    for sub, suffix in (("seeds", ".json"), ("checkpoints", ".ckpt")):
        for f in (run_dir / sub).glob(f"seed*{suffix}"):
            digits = f.name[4 : -len(suffix)]
            if digits.isdigit():
                seeds.add(int(digits))
    return [seed_status(run_dir, s, cfg, now, stale_after) for s in sorted(seeds)]


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def format_status(rows: Sequence[dict[str, Any]]) -> str:
    """One line per seed, grouped by run folder."""
    lines: list[str] = []
    current = None
    for r in rows:
        if r["run"] != current:
            current = r["run"]
            lines.append(current)
        head = f"  seed {r['seed']}: {r['state']:8s}"
        ends = f", first phase ended at {r['phase_ends'][0]}" if r.get("phase_ends") else ""
        if r["state"] == "done":
            test = f", test {r['test'][0]} {r['test'][1]:.4f}" if r.get("test") else ""
            secs = f", {r['seconds'] / 60:.0f} min" if r.get("seconds") else ""
            selected = r.get("selected_round")
            if isinstance(selected, dict) and selected:  # selected per market (select: best_valid)
                low, high = min(selected.values()), max(selected.values())
                selected = f"s {low}–{high} (per market)" if low != high else f" {low}"
            else:
                selected = f" {selected}"
            lines.append(f"{head} {r.get('round')} rounds{ends}, selected round{selected}{test}{secs}")
        elif r["state"] in ("running", "stalled"):
            parts = [f"round {r['round']}/{r['max_rounds']}{ends}"]
            if r.get("latest") is not None:
                b_round, b_value = r["best"]
                parts.append(f"valid {r['metric']} {r['latest']:.4f} (best {b_value:.4f} at {b_round})")
                parts.append(f"{r['since_best']} rounds without a gain")
            if r.get("slope") is not None:
                parts.append(f"slope {r['slope']:+.2e}/round")
            parts.append(f"checkpoint {_ago(r['checkpoint_age'])}")
            hint = "  — continue with --resume" if r["state"] == "stalled" else ""
            lines.append(f"{head} " + ", ".join(parts) + hint)
        elif r["state"] == "unreadable":
            lines.append(f"{head} checkpoint unreadable: {r['error']}")
        else:
            lines.append(f"{head} not started")
    return "\n".join(lines)
