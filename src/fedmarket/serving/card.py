"""The model card of an export (``card.json`` + ``card.md``).

Why: whoever serves a model must be able to tell, without the run folder, how good it was measured to be
(test metrics of the exported seed and the run's mean with a 95 % interval over seeds), under which
evaluation protocol and on which data (fingerprint), and what its training let leave the market: the
method's upload declaration (parameter-name patterns the runtime enforced), the bytes uploaded, and ε when
differential privacy was on.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CARD_FORMAT = "fedmarket-card-1"
SHOWN = (
    "auc",
    "gauc",
    "logloss",
    "hr@10",
    "ndcg@10",
    "full_hr@10",
    "full_ndcg@10",
    "ctr_auc",
    "ctcvr_auc",
)


def interval(mean: float, std: float, n: int) -> list[float] | None:
    """95 % t-interval of a mean over ``n`` seeds (None with one seed: no spread was observed)."""
    if n < 2 or mean is None or std is None or not math.isfinite(mean) or not math.isfinite(std):
        return None
    from scipy import stats

    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return [mean - half, mean + half]


def build_card(
    metrics: dict[str, Any], cfg: Any, market: str, seed: int, meta: dict[str, Any], run_dir: Path
) -> dict[str, Any]:
    seeds = list(metrics.get("seeds") or [])
    seed_file = Path(run_dir) / "seeds" / f"seed{seed}.json"
    seed_test = (
        json.loads(seed_file.read_text()).get("test", {}).get(market, {}) if seed_file.is_file() else {}
    )
    mean = (metrics.get("per_market") or {}).get(market, {})
    std = (metrics.get("per_market_std") or {}).get(market, {})
    over_seeds = {
        k: {"mean": v, "std": std.get(k), "seeds": len(seeds), "ci95": interval(v, std.get(k), len(seeds))}
        for k, v in mean.items()
    }
    privacy = dict(metrics.get("privacy") or {})
    dp_on = cfg.privacy.mode != "off"
    declaration = dict(metrics.get("upload_declaration") or {})
    return {
        "format": CARD_FORMAT,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": metrics.get("name"),
        "label": metrics.get("label"),
        "method": metrics.get("method"),
        "model": metrics.get("model"),
        "dataset": metrics.get("dataset"),
        "market": market,
        "seed": int(seed),
        "selected_round": meta.get("selected_round"),
        "selection": {"rule": cfg.eval.select, "metric": cfg.eval.select_metric},
        "protocol_version": metrics.get("protocol_version"),
        "data_fingerprint": metrics.get("data_fingerprint"),
        "evaluation": (metrics.get("evaluation") or {}).get(market, {}),
        "metrics": {"split": "test", "seed": seed_test, "over_seeds": over_seeds},
        "what_left_the_market": {
            "private": bool(metrics.get("private", True)),
            "upload_declaration": declaration,
            "communication": (metrics.get("communication") or {}).get(market, {}),
            "secure_aggregation": bool(cfg.secure_aggregation.enabled),
        },
        "differential_privacy": {
            "on": dp_on,
            "mode": cfg.privacy.mode,
            "epsilon": privacy.get("epsilon") if dp_on else None,
            "delta": privacy.get("delta") if dp_on else None,
            "guarantee": privacy.get("guarantee") if dp_on else None,
        },
        "notes": list(metrics.get("notes") or []),
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return "—" if value is None else str(value)


def card_markdown(card: dict[str, Any]) -> str:
    left = card["what_left_the_market"]
    decl = left["upload_declaration"]
    dp = card["differential_privacy"]
    lines = [
        f"# Model card: {card['label']} on {card['dataset']} / {card['market']}",
        "",
        f"- run `{card['run']}`, seed {card['seed']}, selected round {card['selected_round']} "
        f"({card['selection']['rule']} on validation {card['selection']['metric']})",
        f"- evaluation protocol {card['protocol_version']}, data fingerprint `{card['data_fingerprint']}`",
        "",
        "## Test metrics",
        "",
        "| metric | this seed | mean over seeds | 95 % interval |",
        "|---|---|---|---|",
    ]
    over = card["metrics"]["over_seeds"]
    for k in SHOWN:
        if k in over or k in card["metrics"]["seed"]:
            o = over.get(k, {})
            ci = o.get("ci95")
            ci_text = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else f"— ({o.get('seeds', 1)} seed)"
            lines.append(
                f"| {k} | {_fmt(card['metrics']['seed'].get(k))} | {_fmt(o.get('mean'))} | {ci_text} |"
            )
    patterns = ", ".join(f"`{p}`" for p in decl.get("patterns") or []) or "nothing"
    lines += [
        "",
        "## What left the market during training",
        "",
        f"- private method: {'yes' if left['private'] else 'NO (raw train interactions were pooled)'}",
        f"- upload declaration: {patterns} ({decl.get('reason', '')})",
        f"- uploaded bytes: {left['communication'].get('up_bytes', '—')} over "
        f"{left['communication'].get('rounds', '—')} round(s); secure aggregation: "
        f"{'on' if left['secure_aggregation'] else 'off'}",
        "- differential privacy: "
        + (f"{dp['mode']}, ε = {_fmt(dp['epsilon'])}, δ = {_fmt(dp['delta'])}" if dp["on"] else "off"),
        "",
    ]
    return "\n".join(lines)
