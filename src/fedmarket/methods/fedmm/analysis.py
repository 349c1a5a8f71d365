"""ANALYSIS ONLY: how well FedMM's level-1 codes agree across markets on items sharing a raw key. It reads
raw item keys, which no federated step ever does, so nothing in training imports this module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedmarket.checkpoint import load_state
from fedmarket.config import load_run_config
from fedmarket.data.prepare import prepare_data


def code_alignment(codes: dict[str, np.ndarray], raw_keys: dict[str, np.ndarray]) -> dict[str, Any]:
    """ANALYSIS ONLY (METHODS.md step 6; reads raw item keys, so no federated step may call it).

    For every pair of markets, over the items sharing a raw key (ASIN): the share that received the same
    level-1 code, against the share expected by chance if codes were independent, Σ_k p_a(k) p_b(k), with
    p_a, p_b the code-usage distributions of the shared items on each side. Pooled over pairs by counts."""
    pairs: dict[str, dict[str, float]] = {}
    same_total = chance_total = n_total = 0.0
    names = list(codes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common, ia, ib = np.intersect1d(
                raw_keys[a].astype(str), raw_keys[b].astype(str), return_indices=True
            )
            if len(common) == 0:
                continue
            ca, cb = codes[a][ia], codes[b][ib]
            k = int(max(ca.max(), cb.max())) + 1
            pa, pb = np.bincount(ca, minlength=k) / len(ca), np.bincount(cb, minlength=k) / len(cb)
            same, chance = float((ca == cb).mean()), float((pa * pb).sum())
            pairs[f"{a}-{b}"] = {"shared_items": len(common), "same_code": same, "chance": chance}
            same_total += same * len(common)
            chance_total += chance * len(common)
            n_total += len(common)
    same = same_total / max(n_total, 1)
    chance = chance_total / max(n_total, 1)
    return {
        "same_code": same,
        "chance": chance,
        "lift": same / chance if chance > 0 else float("nan"),
        "shared_pairs": int(n_total),
        "pairs": pairs,
    }


def alignment_from_run(run_dir: str | Path, write: bool = True) -> dict[str, Any]:
    """ANALYSIS ONLY: level-1 code alignment of every seed of a FedMM run folder, from the codes stored in
    its round checkpoints, written to ``alignment.json`` in the run folder."""

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    data = prepare_data(cfg)
    raw = {n: s.market.item_ids for n, s in data.splits.items()}
    out: dict[str, Any] = {
        "note": "analysis only: uses raw item keys (ASIN), never part of training",
        "seeds": {},
    }
    for ckpt in sorted((run_dir / "checkpoints").glob("seed*.ckpt")):
        state = load_state(ckpt)
        codes = {m: s["codes"][0] for m, s in state["trainers"].items() if s.get("codes") is not None}
        if codes:
            out["seeds"][ckpt.stem] = code_alignment(codes, {m: raw[m] for m in codes})
    seeds = list(out["seeds"].values())
    if seeds:
        out["same_code"] = float(np.mean([s["same_code"] for s in seeds]))
        out["chance"] = float(np.mean([s["chance"] for s in seeds]))
        out["lift"] = out["same_code"] / out["chance"] if out["chance"] > 0 else float("nan")
    if write:
        (run_dir / "alignment.json").write_text(json.dumps(out, indent=2))
    return out
