"""Summarise a FeCoSR comparison: merged run folders (``fedmarket grid`` -> ``OUT/merged``) of the
sequential datasets -> ``OUT/summary.md`` and one ``OUT/<dataset>/report.md`` per dataset (the standard
``fedmarket report``: per-market plots, the transfer's gain over local).

``summary.md`` has, per dataset: one row per method (seeds, rounds trained and where pre-training / the source
phase ended, test full-ranking and 1+99 NDCG@10 / HR@10 ×100 as mean ± std over seeds, MB uploaded per market
in the whole run), full NDCG@10 per market, the comparison's questions as paired per-seed differences
(FeCoSR vs FedAvg-CE + fine-tune, vs transfer, vs Local text; S²CE vs CE without fine-tuning; the share of the
Local -> Central gap FeCoSR closes) and the transfer's source market and negative-transfer count;
the phased long-pre-training rows' first phases (pre-trained model without fine-tuning, zero-shot transfer)
are derived from the test metrics their runs recorded at the phase end (``OUT/phase1/``, no extra training);
``OUT/fecosr_<dataset>.png`` shows full NDCG@10 per row with std error bars. ``OUT/headline.md`` is the short
version the README shows: the comparison's rows under the current protocol (matched 150-round first phases,
server momentum) with the MovieLens splits side by side, and its questions as paired differences per split.

    python scripts/compare_fecosr.py runs/mlage/merged runs/mlzip/merged runs/xmseq/merged --out runs/fecosr_comparison
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedmarket.eval.convergence import stop_slopes  # noqa: E402
from fedmarket.lab.summary import (  # noqa: E402
    find_rows,
    finish_dataset,
    matched_rounds,
    paired,
    per_seed_average,
    rounds_text,
    upload_bytes,
)
from fedmarket.report import TRANSFER_REFERENCE, gain_over_local  # noqa: E402

ROWS = [  # (suffix of the config name, label)
    ("seq_local_id", "Local ID-SASRec"),
    ("seq_local_text", "Local text-SASRec"),
    ("seq_local_text_ft", "Local text-SASRec + local fine-tune (FeCoSR's stages, nothing federated)"),
    ("seq_transfer", "One-to-one transfer (text) + fine-tune"),
    ("seq_fedavg", "FedAvg-CE (no fine-tune)"),
    ("fecosr_no-ft", "FeCoSR without fine-tune (FedAvg-S²CE)"),
    ("seq_fedavg_ft", "FedAvg-CE + fine-tune (= FeCoSR with CE)"),
    ("fecosr_ce", "FeCoSR with CE (config of its own)"),
    ("fecosr", "**FeCoSR** (S²CE + fine-tune)"),
    ("seq_transfer_long-pt", "One-to-one transfer + fine-tune, source phase ≤ 150 rounds"),
    ("seq_fedavg_ft_long-pt", "FedAvg-CE + fine-tune, pre-training ≤ 150 rounds"),
    ("fecosr_long-pt", "**FeCoSR**, pre-training ≤ 150 rounds"),
    (
        "seq_transfer_long-pt_phase1",
        "One-to-one transfer, zero-shot (source phase ≤ 150 rounds, no fine-tune)",
    ),
    (
        "seq_fedavg_ft_long-pt_phase1",
        "FedAvg-CE without fine-tune (pre-training ≤ 150 rounds, at its patience-3 stop)",
    ),
    (
        "fecosr_long-pt_phase1",
        "FeCoSR without fine-tune (pre-training ≤ 150 rounds, at its patience-3 stop)",
    ),
    ("seq_fedavg_ft_fixed-pt", "FedAvg-CE + fine-tune, pre-training 150 rounds (fixed, matched)"),
    ("fecosr_fixed-pt", "**FeCoSR**, pre-training 150 rounds (fixed, matched)"),
    ("fecosr_whiten_fixed-pt", "FeCoSR, whitened S²CE target, pre-training 150 rounds (fixed, matched)"),
    ("fecosr_slr2_fixed-pt", "**FeCoSR**, server lr 2, pre-training 150 rounds (fixed, matched)"),
    (
        "seq_fedavg_ft_slr2_fixed-pt",
        "FedAvg-CE + fine-tune, server lr 2, pre-training 150 rounds (fixed, matched)",
    ),
    (
        "fecosr_m05_fixed-pt",
        "**FeCoSR**, server momentum 0.5, pre-training 150 rounds (fixed, matched)",
    ),
    (
        "seq_fedavg_ft_m05_fixed-pt",
        "FedAvg-CE + fine-tune, server momentum 0.5, pre-training 150 rounds (fixed, matched)",
    ),
    ("seq_transfer_fixed-pt", "One-to-one transfer + fine-tune, source phase 150 rounds (fixed, matched)"),
    ("seq_transfer_fixed-pt_phase1", "One-to-one transfer, zero-shot (source phase 150 rounds, fixed)"),
    ("seq_fedavg_ft_fixed-pt_phase1", "FedAvg-CE without fine-tune (150 rounds, fixed)"),
    ("fecosr_fixed-pt_phase1", "FeCoSR without fine-tune (150 rounds, fixed)"),
    ("fecosr_whiten_fixed-pt_phase1", "FeCoSR without fine-tune, whitened S²CE target (150 rounds, fixed)"),
    ("fecosr_slr2_fixed-pt_phase1", "FeCoSR without fine-tune, server lr 2 (150 rounds, fixed)"),
    ("seq_fedavg_ft_slr2_fixed-pt_phase1", "FedAvg-CE without fine-tune, server lr 2 (150 rounds, fixed)"),
    ("fecosr_m05_fixed-pt_phase1", "FeCoSR without fine-tune, server momentum 0.5 (150 rounds, fixed)"),
    (
        "seq_fedavg_ft_m05_fixed-pt_phase1",
        "FedAvg-CE without fine-tune, server momentum 0.5 (150 rounds, fixed)",
    ),
    ("seq_fedavg_slr1_pilot30", "FedAvg-CE, 30 rounds, server lr 1 (pilot)"),
    ("seq_fedavg_slr2_pilot30", "FedAvg-CE, 30 rounds, server lr 2 (pilot)"),
    ("seq_fedavg_slr4_pilot30", "FedAvg-CE, 30 rounds, server lr 4 (pilot)"),
    ("seq_fedavg_slr3_pilot30", "FedAvg-CE, 30 rounds, server lr 3 (pilot)"),
    ("seq_fedavg_slr1_m05_pilot30", "FedAvg-CE, 30 rounds, server momentum 0.5 (pilot)"),
    ("seq_fedavg_slr1_m067_pilot30", "FedAvg-CE, 30 rounds, server momentum 0.667 (pilot)"),
    ("seq_fedavg_adam1e-3_pilot30", "FedAvg-CE, 30 rounds, FedAdam η 1e-3 (pilot)"),
    ("seq_fedavg_adam3e-3_pilot30", "FedAvg-CE, 30 rounds, FedAdam η 3e-3 (pilot)"),
    ("seq_fedavg_adam1e-2_pilot30", "FedAvg-CE, 30 rounds, FedAdam η 1e-2 (pilot)"),
    ("seq_transfer_id", "One-to-one transfer (IDs) + fine-tune"),
    ("seq_fedavg_id", "FedAvg of the Transformer, local IDs"),
    ("seq_central_shared_ids", "Central-shared-IDs † (pooled, NOT private)"),
    ("seq_local_id_p10", "Local ID-SASRec, to convergence (patience 10, ≤ 300 rounds)"),
    ("seq_local_text_p10", "Local text-SASRec, to convergence (patience 10, ≤ 300 rounds)"),
    ("seq_central_shared_ids_p10", "Central-shared-IDs †, to convergence (patience 10, ≤ 300 rounds)"),
    (
        "fecosr_m05_pt-p10",
        "**FeCoSR**, server momentum 0.5, pre-training to its plateau (patience 10, ≤ 300 rounds)",
    ),
    (
        "seq_fedavg_ft_m05_pt-p10",
        "FedAvg-CE + fine-tune, server momentum 0.5, pre-training to its plateau (patience 10, ≤ 300 rounds)",
    ),
    (
        "seq_transfer_pt-p10",
        "One-to-one transfer + fine-tune, source phase to its plateau (patience 10, ≤ 300 rounds)",
    ),
    ("fecosr_m05_pt-p10_phase1", "FeCoSR without fine-tune, server momentum 0.5, pre-trained to its plateau"),
    (
        "seq_fedavg_ft_m05_pt-p10_phase1",
        "FedAvg-CE without fine-tune, server momentum 0.5, pre-trained to its plateau",
    ),
    ("seq_transfer_pt-p10_phase1", "One-to-one transfer, zero-shot (source phase to its plateau)"),
    ("seq_transfer_id_p10", "One-to-one transfer (IDs) + fine-tune, to convergence (patience 10)"),
    ("seq_fedavg_id_p10", "FedAvg of the Transformer, local IDs, to convergence (patience 10, ≤ 300 rounds)"),
]
METRICS = ("full_ndcg@10", "full_hr@10", "ndcg@10", "hr@10")
CHECKS = [  # (a, b, text): a − b per seed
    ("fecosr", "seq_fedavg_ft", "FeCoSR − FedAvg-CE + fine-tune (S²CE vs CE, with fine-tune)"),
    ("fecosr_no-ft", "seq_fedavg", "FeCoSR w/o fine-tune − FedAvg-CE (S²CE vs CE, no fine-tune)"),
    ("fecosr", "seq_transfer", "FeCoSR − one-to-one transfer"),
    ("fecosr_long-pt", "fecosr", "FeCoSR, pre-training ≤ 150 rounds − FeCoSR (≤ 40)"),
    ("seq_transfer_long-pt", "seq_transfer", "One-to-one transfer, source phase ≤ 150 rounds − source ≤ 40"),
    (
        "fecosr_long-pt",
        "seq_transfer",
        "FeCoSR, pre-training ≤ 150 rounds − one-to-one transfer (source ≤ 40)",
    ),
    (
        "fecosr_long-pt",
        "seq_transfer_long-pt",
        "FeCoSR − one-to-one transfer, both first phases ≤ 150 rounds",
    ),
    (
        "fecosr_long-pt",
        "seq_fedavg_ft_long-pt",
        "FeCoSR − FedAvg-CE + fine-tune, both pre-trainings ≤ 150 rounds",
    ),
    (
        "fecosr_long-pt_phase1",
        "seq_fedavg_ft_long-pt_phase1",
        "FeCoSR w/o fine-tune − FedAvg-CE, both pre-trained to their plateau (S²CE vs CE, no fine-tune)",
    ),
    (
        "fecosr_fixed-pt",
        "seq_fedavg_ft_fixed-pt",
        "FeCoSR − FedAvg-CE + fine-tune, both pre-trained 150 rounds (S²CE vs CE at matched compute)",
    ),
    (
        "fecosr_fixed-pt_phase1",
        "seq_fedavg_ft_fixed-pt_phase1",
        "FeCoSR w/o fine-tune − FedAvg-CE, 150 pre-training rounds each (S²CE vs CE, no fine-tune)",
    ),
    (
        "fecosr_whiten_fixed-pt",
        "seq_fedavg_ft_fixed-pt",
        "FeCoSR, whitened S²CE target − FedAvg-CE + fine-tune, both pre-trained 150 rounds",
    ),
    (
        "fecosr_whiten_fixed-pt_phase1",
        "seq_fedavg_ft_fixed-pt_phase1",
        "The same without fine-tune (whitened S²CE vs CE, 150 pre-training rounds each)",
    ),
    (
        "fecosr_fixed-pt",
        "seq_transfer_long-pt",
        "FeCoSR, 150 pre-training rounds − one-to-one transfer (source ≤ 150)",
    ),
    (
        "fecosr_fixed-pt",
        "seq_transfer_fixed-pt",
        "FeCoSR − one-to-one transfer, both first phases exactly 150 rounds (matched)",
    ),
    (
        "fecosr_slr2_fixed-pt",
        "seq_transfer_fixed-pt",
        "FeCoSR with server lr 2 − one-to-one transfer, both first phases exactly 150 rounds",
    ),
    (
        "fecosr_slr2_fixed-pt_phase1",
        "seq_transfer_fixed-pt_phase1",
        "FeCoSR w/o fine-tune, server lr 2 − transfer zero-shot (150 first-phase rounds each)",
    ),
    (
        "fecosr_slr2_fixed-pt",
        "fecosr_fixed-pt",
        "FeCoSR: server lr 2 − server lr 1 (150 pre-training rounds each)",
    ),
    (
        "fecosr_slr2_fixed-pt_phase1",
        "fecosr_fixed-pt_phase1",
        "FeCoSR w/o fine-tune: server lr 2 − server lr 1 (150 pre-training rounds each)",
    ),
    (
        "fecosr_slr2_fixed-pt",
        "seq_fedavg_ft_slr2_fixed-pt",
        "FeCoSR − FedAvg-CE + fine-tune, both server lr 2, 150 pre-training rounds (S²CE vs CE)",
    ),
    (
        "fecosr_slr2_fixed-pt_phase1",
        "seq_fedavg_ft_slr2_fixed-pt_phase1",
        "FeCoSR w/o fine-tune − FedAvg-CE, both server lr 2, 150 rounds (S²CE vs CE, no fine-tune)",
    ),
    (
        "seq_fedavg_ft_slr2_fixed-pt",
        "seq_transfer_fixed-pt",
        "FedAvg-CE + fine-tune, server lr 2 − one-to-one transfer (150 first-phase rounds each)",
    ),
    (
        "seq_fedavg_ft_slr2_fixed-pt",
        "seq_fedavg_ft_fixed-pt",
        "FedAvg-CE + fine-tune: server lr 2 − server lr 1 (150 pre-training rounds each)",
    ),
    (
        "fecosr_m05_fixed-pt",
        "seq_transfer_fixed-pt",
        "FeCoSR with server momentum 0.5 − one-to-one transfer (150 first-phase rounds each)",
    ),
    (
        "fecosr_m05_fixed-pt",
        "fecosr_slr2_fixed-pt",
        "FeCoSR: server momentum 0.5 − server lr 2 (same steady step, 150 pre-training rounds each)",
    ),
    (
        "fecosr_m05_fixed-pt_phase1",
        "fecosr_slr2_fixed-pt_phase1",
        "FeCoSR w/o fine-tune: server momentum 0.5 − server lr 2 (150 rounds each)",
    ),
    (
        "fecosr_m05_fixed-pt",
        "seq_fedavg_ft_m05_fixed-pt",
        "FeCoSR − FedAvg-CE + fine-tune, both server momentum 0.5, 150 pre-training rounds (S²CE vs CE)",
    ),
    (
        "seq_fedavg_ft_m05_fixed-pt",
        "seq_transfer_fixed-pt",
        "FedAvg-CE + fine-tune, server momentum 0.5 − one-to-one transfer (150 first-phase rounds each)",
    ),
    ("seq_fedavg_slr2_pilot30", "seq_fedavg_slr1_pilot30", "FedAvg-CE at round 30: server lr 2 − 1 (pilot)"),
    ("seq_fedavg_slr3_pilot30", "seq_fedavg_slr2_pilot30", "FedAvg-CE at round 30: server lr 3 − 2 (pilot)"),
    (
        "seq_fedavg_slr1_m05_pilot30",
        "seq_fedavg_slr2_pilot30",
        "FedAvg-CE at round 30: momentum 0.5 − server lr 2 (same steady step; pilot)",
    ),
    (
        "seq_fedavg_slr1_m067_pilot30",
        "seq_fedavg_slr3_pilot30",
        "FedAvg-CE at round 30: momentum 0.667 − server lr 3 (same steady step; pilot)",
    ),
    (
        "seq_fedavg_adam1e-3_pilot30",
        "seq_fedavg_slr2_pilot30",
        "FedAvg-CE at round 30: FedAdam η 1e-3 − server lr 2 (pilot)",
    ),
    (
        "seq_fedavg_adam3e-3_pilot30",
        "seq_fedavg_slr2_pilot30",
        "FedAvg-CE at round 30: FedAdam η 3e-3 − server lr 2 (pilot)",
    ),
    (
        "seq_fedavg_adam1e-2_pilot30",
        "seq_fedavg_slr2_pilot30",
        "FedAvg-CE at round 30: FedAdam η 1e-2 − server lr 2 (pilot)",
    ),
    (
        "seq_fedavg_ft_fixed-pt",
        "seq_fedavg_ft_long-pt",
        "FedAvg-CE + fine-tune: 150 pre-training rounds − pre-training stopped by patience",
    ),
    (
        "fecosr_fixed-pt",
        "fecosr_long-pt",
        "FeCoSR: 150 pre-training rounds − pre-training stopped by patience",
    ),
    (
        "fecosr_long-pt",
        "fecosr_long-pt_phase1",
        "FeCoSR, pre-training ≤ 150 rounds − its pre-trained model (what fine-tuning adds)",
    ),
    (
        "seq_fedavg_ft_long-pt",
        "seq_fedavg",
        "FedAvg-CE + fine-tune, pre-training ≤ 150 rounds − FedAvg-CE (what fine-tuning adds)",
    ),
    ("fecosr_long-pt", "fecosr_no-ft", "FeCoSR, pre-training ≤ 150 rounds − FeCoSR w/o fine-tune"),
    ("fecosr_long-pt", "seq_local_id", "FeCoSR, pre-training ≤ 150 rounds − Local ID-SASRec"),
    ("fecosr", "seq_local_text", "FeCoSR − Local text-SASRec"),
    ("fecosr", "seq_local_id", "FeCoSR − Local ID-SASRec"),
    (
        "fecosr",
        "seq_local_text_ft",
        "FeCoSR − its two stages with nothing federated (what collaboration gives)",
    ),
    ("seq_fedavg_ft", "seq_local_text_ft", "FedAvg-CE + fine-tune − the same with nothing federated"),
    ("fecosr", "seq_central_shared_ids", "FeCoSR − Central-shared-IDs †"),
    ("seq_fedavg_ft", "seq_fedavg", "FedAvg-CE + fine-tune − FedAvg-CE (what fine-tuning adds)"),
    ("seq_transfer", "seq_local_text", "Transfer − Local text-SASRec"),
    ("seq_local_text", "seq_local_id", "Local text − Local ID"),
    ("seq_fedavg_id", "seq_local_id", "FedAvg (IDs) − Local ID"),
    ("seq_transfer_id", "seq_local_id", "Transfer (IDs) − Local ID"),
    ("fecosr_m05_pt-p10", "seq_transfer_pt-p10", "FeCoSR − one-to-one transfer, every phase to its plateau"),
    (
        "seq_fedavg_ft_m05_pt-p10",
        "seq_transfer_pt-p10",
        "FedAvg-CE + fine-tune − one-to-one transfer, every phase to its plateau",
    ),
    ("fecosr_m05_pt-p10", "seq_fedavg_ft_m05_pt-p10", "S²CE − CE with fine-tune, every phase to its plateau"),
    ("fecosr_m05_pt-p10", "fecosr_m05_fixed-pt", "FeCoSR, pre-training to its plateau − fixed 150 rounds"),
    ("seq_fedavg_id_p10", "seq_local_id_p10", "FedAvg (IDs) − Local ID, both to convergence"),
    ("seq_transfer_id_p10", "seq_local_id_p10", "Transfer (IDs) − Local ID, both to convergence"),
]


HEADLINE = [  # (row, label): the current protocol, both MovieLens splits side by side (OUT/headline.md)
    ("seq_local_id_p10", "Local ID-SASRec"),
    ("seq_local_text_p10", "Local text-SASRec"),
    ("seq_local_id", "Local ID-SASRec, patience-3 stop"),
    ("seq_local_text", "Local text-SASRec, patience-3 stop"),
    ("seq_transfer_fixed-pt_phase1", "One-to-one transfer, zero-shot (source model alone)"),
    ("seq_transfer_fixed-pt", "One-to-one transfer + fine-tune"),
    ("seq_fedavg_ft_m05_fixed-pt_phase1", "FedAvg-CE without fine-tune"),
    ("fecosr_m05_fixed-pt_phase1", "FeCoSR without fine-tune (FedAvg-S²CE)"),
    ("seq_fedavg_ft_m05_fixed-pt", "FedAvg-CE + fine-tune (= FeCoSR with CE)"),
    ("fecosr_m05_fixed-pt", "**FeCoSR** (S²CE + fine-tune)"),
    ("seq_fedavg_ft_slr2_fixed-pt", "FedAvg-CE + fine-tune, server lr 2 instead of momentum"),
    ("fecosr_slr2_fixed-pt", "FeCoSR, server lr 2 instead of momentum"),
    ("seq_central_shared_ids_p10", "Central-shared-IDs † (pooled, NOT private)"),
    ("seq_central_shared_ids", "Central-shared-IDs †, patience-3 stop"),
]
HEADLINE_CHECKS = [  # (a, b, text): a − b per seed, per split
    ("fecosr_m05_fixed-pt", "seq_transfer_fixed-pt", "FeCoSR − one-to-one transfer"),
    ("seq_fedavg_ft_m05_fixed-pt", "seq_transfer_fixed-pt", "FedAvg-CE + fine-tune − one-to-one transfer"),
    ("fecosr_m05_fixed-pt", "seq_fedavg_ft_m05_fixed-pt", "S²CE − CE, with fine-tune (FeCoSR − its CE twin)"),
    ("fecosr_m05_fixed-pt_phase1", "seq_fedavg_ft_m05_fixed-pt_phase1", "S²CE − CE, without fine-tune"),
    ("fecosr_slr2_fixed-pt", "seq_transfer_fixed-pt", "FeCoSR, server lr 2 − one-to-one transfer"),
    (
        "seq_fedavg_ft_slr2_fixed-pt",
        "seq_transfer_fixed-pt",
        "FedAvg-CE + FT, server lr 2 − one-to-one transfer",
    ),
    ("fecosr_slr2_fixed-pt", "seq_fedavg_ft_slr2_fixed-pt", "S²CE − CE, with fine-tune, server lr 2"),
    ("fecosr_m05_fixed-pt", "seq_local_text_p10", "FeCoSR − Local text-SASRec"),
    ("fecosr_m05_fixed-pt", "seq_local_id_p10", "FeCoSR − Local ID-SASRec"),
    ("fecosr_m05_fixed-pt", "seq_local_text", "FeCoSR − Local text-SASRec, patience-3 stop"),
]
HEADLINE_NOTE = (
    'Test ×100, markets averaged unweighted, mean ± std over seeds (how many in brackets; "–": not run). '
    "Federated and transfer rows at matched compute: pre-training (transfer: its source phase) exactly 150 rounds "
    "of one local epoch, then local fine-tuning until 10 rounds bring no validation gain; FedAvg rows with server "
    "momentum β = 0.5 (FedAvgM) unless the row says server lr 2 (without a server step FedAvg pre-trains too slowly "
    "to compete: summary.md). Local and Central rows to convergence: until 10 rounds bring no validation gain, "
    "within 300 rounds (the federated rows' cap); their patience-3 rows stopped while validation still rose."
)


def upload_cell(m: dict) -> str:
    """MB uploaded per market over the run, or "raw data" for a pooled (not private) row."""
    return "raw data" if not m.get("private", True) else f"{upload_bytes(m) / 1e6:.2f}"


def seed_cell(m: dict | None, key: str) -> str:
    return "–" if m is None else f"{cell(m, key)} ({len(m['seeds'])})"


def headline(merged: list[Path], datasets: list[str]) -> list[str]:
    """The comparison's rows under the current protocol with every split side by side, then its questions as
    paired per-seed differences per split: the table the README shows. Empty when no split has any of its
    rows."""
    found = {ds: {s: (d, m) for s, _, d, m in find_rows(merged, ds, HEADLINE)} for ds in datasets}
    found = {ds: rows for ds, rows in found.items() if rows}
    if not found:
        return []
    head = " | ".join(f"{ds} full NDCG@10 | {ds} NDCG@10 (1+99)" for ds in found)
    lines = [
        "# FeCoSR: the headline",
        "",
        HEADLINE_NOTE,
        "",
        f"| row | {head} | up MB / market (per split) |",
        "|---|" + "---:|" * (2 * len(found)) + "---:|",
    ]
    for suffix, label in HEADLINE:
        ms = [rows.get(suffix, (None, None))[1] for rows in found.values()]
        if all(m is None for m in ms):
            continue
        cells = [seed_cell(m, k) for m in ms for k in ("full_ndcg@10", "ndcg@10")]
        ups = [upload_cell(m) for m in ms if m is not None]
        up = ups[0] if len(set(ups)) == 1 else " / ".join(ups)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {up} |")
    lines += [
        "",
        "Paired differences ×100 (same seed; mean ± std over seeds; wins = seeds where the first row is ahead), "
        "full-ranking NDCG@10:",
        "",
        "| comparison | " + " | ".join(found) + " |",
        "|---|" + "---:|" * len(found),
    ]
    for a, b, text in HEADLINE_CHECKS:
        cells = [
            paired(
                per_seed_average(rows[a][0], "full_ndcg@10"),
                per_seed_average(rows[b][0], "full_ndcg@10"),
                100,
                2,
            )
            if a in rows and b in rows
            else "–"
            for rows in found.values()
        ]
        if any(c != "–" for c in cells):
            lines.append(f"| {text} | " + " | ".join(cells) + " |")
    return lines + [""]


PHASED = (
    "fecosr_long-pt",
    "seq_fedavg_ft_long-pt",
    "seq_transfer_long-pt",
    "fecosr_fixed-pt",
    "seq_fedavg_ft_fixed-pt",
    "fecosr_whiten_fixed-pt",
    "fecosr_slr2_fixed-pt",
    "seq_fedavg_ft_slr2_fixed-pt",
    "fecosr_m05_fixed-pt",
    "seq_fedavg_ft_m05_fixed-pt",
    "seq_transfer_fixed-pt",
    "fecosr_m05_pt-p10",
    "seq_fedavg_ft_m05_pt-p10",
    "seq_transfer_pt-p10",
)


def derive_first_phases(merged: list[Path], datasets: list[str], out: Path) -> list[str]:
    """``OUT/phase1/<dataset>_<row>_phase1``: the first phase of each phased long-pre-training row, from the
    test metrics its runs recorded where pre-training (the source phase) ended (`fedmarket.lab.runs.first_phase_run`;
    seeds run before fedmarket recorded them are left out). Returns what was derived or skipped, for the log."""
    import shutil

    from fedmarket.errors import FedmarketError
    from fedmarket.lab.runs import first_phase_run

    root = out / "phase1"
    if root.exists():
        shutil.rmtree(root)
    log = []
    for dataset in datasets:
        for suffix in PHASED:
            name = f"{dataset}_{suffix}"
            run_dir = next((d / name for d in merged if (d / name / "metrics.json").is_file()), None)
            if run_dir is None:
                continue
            root.mkdir(parents=True, exist_ok=True)
            try:
                first_phase_run(run_dir, root / f"{name}_phase1", skip_missing=True)
                log.append(f"{name}: first phase derived")
            except FedmarketError as exc:
                log.append(f"{name}: no first phase ({exc})")
    return log


def cell(m: dict, key: str) -> str:
    mean = 100 * m["average"][key]
    std = 100 * (m.get("average_std") or {}).get(key, 0.0)
    return f"{mean:.2f} ± {std:.2f}" if len(m["seeds"]) > 1 else f"{mean:.2f}"


def gap_closed(by: dict[str, Path], metric: str, row: str, low: str, high: str) -> str | None:
    """Share of the Local text -> Central gap (rows ``low`` -> ``high``) that the FeCoSR row ``row`` closes, per
    seed (mean over seeds)."""
    if not all(k in by for k in (row, low, high)):
        return None
    f, lo, hi = (per_seed_average(by[k], metric) for k in (row, low, high))
    seeds = sorted(set(f) & set(lo) & set(hi))
    shares = [(f[s] - lo[s]) / (hi[s] - lo[s]) for s in seeds if hi[s] != lo[s]]
    if not shares:
        return None
    return f"{100 * np.mean(shares):.0f} % of the Local text → Central gap (seeds: {len(shares)})"


def transfer_reference(suffix: str, method: str, by: dict[str, Any]) -> str | None:
    """The local row a transfer row is compared with: the same variant of its local reference
    (``seq_transfer_id_p10`` -> ``seq_local_id_p10``) when that row is present, else the plain reference
    (``fedmarket.report.TRANSFER_REFERENCE``)."""
    ref = TRANSFER_REFERENCE[method]
    if suffix.startswith(method) and ref + suffix[len(method) :] in by:
        return ref + suffix[len(method) :]
    return ref if ref in by else None


def transfer_lines(found: list[tuple[str, str, Path, dict]], metric: str) -> list[str]:
    """Each transfer row's gain over its local reference (``transfer_reference``, computed by
    ``fedmarket.report.gain_over_local``): the source market's gain and how many targets lose (negative
    transfer)."""
    by = {s: m for s, _, _, m in found}
    lines = []
    for suffix, _, _, run in found:
        if run.get("method") not in TRANSFER_REFERENCE or suffix.endswith("_phase1"):
            continue
        ref_suffix = transfer_reference(suffix, run["method"], by)
        if ref_suffix is None:
            continue
        result = gain_over_local([by[ref_suffix], run], [ref_suffix, suffix], metric)
        if result is None:
            continue
        gains, ref, source = result
        g = {mk: 100 * v for mk, v in gains[suffix].items()}
        targets = [mk for mk in g if mk != source]
        negative = [mk for mk in targets if g[mk] < 0]
        text = (
            f"- `{suffix}` vs `{ref}` ({metric}, ×100, mean over seeds): source `{source}` "
            f"{g.get(source, float('nan')):+.2f}; negative transfer in {len(negative)} of {len(targets)} targets"
        )
        if negative:
            text += " (" + ", ".join(f"`{mk}` {g[mk]:+.2f}" for mk in sorted(negative, key=g.get)) + ")"
        lines.append(text + ".")
        comm = run.get("communication") or {}
        once = max((float(v.get("down_bytes", 0)) for v in comm.values()), default=0.0)
        sent = max((float(v.get("up_bytes", 0)) for v in comm.values()), default=0.0)
        if once > 0 and sent > once:
            lines.append(
                f"  The source uploaded its model {sent / once:.0f} times ({sent / 1e6:.2f} MB), once per "
                f"source round so that every target could be scored zero-shot each round; a deployment sends it "
                f"once: {once / 1e6:.2f} MB from the source, {once / len(comm) / 1e6:.2f} MB per market on "
                f"average (the table's upload column counts the run)."
            )
    return lines


def stop_lines(found: list[tuple[str, str, Path, dict]], window: int = 20) -> list[str]:
    """Where early stopping stopped each row with ``train.patience`` (phase ends and convergence, mean over
    seeds) and the validation slope over the last ``window`` rounds before: still rising = not a plateau."""
    rows = []
    for suffix, label, run_dir, _ in found:
        if suffix.endswith("_phase1"):
            continue  # the same stops as the run it is derived from
        by_kind: dict[str, list[dict]] = {}
        for r in stop_slopes(run_dir, "ndcg@10", window):
            by_kind.setdefault(r["kind"], []).append(r)
        for kind, rs in by_kind.items():
            rounds = ", ".join(str(r["round"]) for r in rs)
            slopes = [1000 * r["slope"] for r in rs if np.isfinite(r["slope"])] or [float("nan")]
            rows.append(
                f"| {label} | {kind} | {rounds} | {np.mean([100 * r['score'] for r in rs]):.2f} | "
                f"{np.mean(slopes):+.2f} ({min(slopes):+.2f} … {max(slopes):+.2f}) |"
            )
    if not rows:
        return []
    return [
        f"Where early stopping stopped (validation NDCG@10 on 1+99, mean over markets; slope of a line fitted to "
        f"the last ≤ {window} rounds of the phase (its second half when shorter), ×10⁻³ per round, mean (range) over seeds). A slope well above 0 "
        "means the patience rule fired on noise while the score was still rising: not a plateau.",
        "",
        "| row | stop | rounds (per seed) | val NDCG@10 ×100 | slope ×10⁻³ / round |",
        "|---|---|---|---:|---:|",
        *rows,
        "",
    ]


MATCHED = [  # (S²CE row, CE row, pre-training budget): first phases compared round by round
    ("fecosr", "seq_fedavg_ft", "≤ 40 rounds"),
    ("fecosr_long-pt", "seq_fedavg_ft_long-pt", "≤ 150, each to its patience-3 stop"),
    ("fecosr_fixed-pt", "seq_fedavg_ft_fixed-pt", "150 rounds, fixed"),
    ("fecosr_whiten_fixed-pt", "seq_fedavg_ft_fixed-pt", "150 rounds, fixed, whitened S²CE target"),
    ("fecosr_slr2_fixed-pt", "seq_fedavg_ft_slr2_fixed-pt", "150 rounds, fixed, server lr 2"),
    ("fecosr_m05_fixed-pt", "seq_fedavg_ft_m05_fixed-pt", "150 rounds, fixed, server momentum 0.5"),
]


def matched_lines(by: dict[str, Path], out: Path, dataset: str) -> list[str]:
    """FedAvg-S²CE against FedAvg-CE pre-training round by round (the same compute), per seed; the curves
    are plotted to ``out/fecosr_matched_<dataset>.png``."""
    rows = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (a, b, budget) in enumerate(MATCHED):
        if a not in by or b not in by:
            continue
        for j, r in enumerate(matched_rounds(by[a], by[b], "ndcg@10")):
            rows.append(
                f"| {budget} | {r['seed']} | 1–{r['last_round']} | {r['a_ahead']} of {r['rounds']} | "
                f"{1000 * r['mean_diff']:+.1f} | {1000 * r['last_diff']:+.1f} |"
            )
            color = f"C{i}"
            for curve, style, loss in ((r["curve_b"], "-", "CE"), (r["curve_a"], "--", "S²CE")):
                label = f"{loss}, {budget}" if j == 0 else None  # one legend entry per pair and loss
                ax.plot(list(curve), list(curve.values()), style, color=color, lw=1, label=label)
    if not rows:
        plt.close(fig)
        return []
    ax.set_xlabel("pre-training round (FedAvg)")
    ax.set_ylabel("validation NDCG@10 (1+99), market mean")
    ax.set_title(f"{dataset}: FedAvg-CE (solid) vs FedAvg-S²CE (dashed), every seed", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"fecosr_matched_{dataset}.png", dpi=110)
    plt.close(fig)
    return [
        "S²CE vs CE pre-training at matched rounds (FedAvg-S²CE − FedAvg-CE, validation NDCG@10 on 1+99, mean "
        "over markets, ×10⁻³; every round both pre-trainings reached, so the same compute):",
        "",
        "| pre-training | seed | rounds | S²CE ahead | mean difference | at the last common round |",
        "|---|---:|---|---:|---:|---:|",
        *rows,
        "",
        f"![S²CE vs CE at matched rounds, {dataset}](fecosr_matched_{dataset}.png)",
        "",
    ]


def summarise(merged: list[Path], dataset: str, out: Path) -> list[str]:
    found = find_rows(merged, dataset, ROWS)
    if not found:
        return []
    lines = [f"## {dataset}", ""]
    lines += [
        "| row | seeds | rounds trained | full NDCG@10 | full HR@10 | NDCG@10 (1+99) | HR@10 (1+99) "
        "| up MB / market (run) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for _, label, _, m in found:
        up = upload_cell(m)
        lines.append(
            f"| {label} | {len(m['seeds'])} | {rounds_text(m)} | "
            + " | ".join(cell(m, k) for k in METRICS)
            + f" | {up} |"
        )
    lines += [
        "",
        "Test metrics ×100 of each seed's best validation round (NDCG@10 on 1+99 candidates); "
        "mean ± std over seeds; markets averaged unweighted.",
        "",
    ]
    markets = found[0][3]["markets"]
    lines += [
        "Full-ranking NDCG@10 ×100 per market (mean over seeds):",
        "",
        "| row | " + " | ".join(markets) + " | average |",
        "|---|" + "---:|" * (len(markets) + 1),
    ]
    for _, label, _, m in found:
        vals = [100 * m["per_market"][mk]["full_ndcg@10"] for mk in markets if mk in m["per_market"]]
        lines.append(
            f"| {label} | "
            + " | ".join(
                f"{100 * m['per_market'][mk]['full_ndcg@10']:.2f}" if mk in m["per_market"] else "–"
                for mk in markets
            )
            + f" | {np.mean(vals):.2f} |"
        )
    lines.append("")
    by = {suffix: run_dir for suffix, _, run_dir, _ in found}
    rows = []
    for a, b, text in CHECKS:
        if a in by and b in by:
            cells = [
                paired(per_seed_average(by[a], k), per_seed_average(by[b], k), scale=100, digits=2)
                for k in ("full_ndcg@10", "ndcg@10")
            ]
            rows.append(f"| {text} | {cells[0]} | {cells[1]} |")
    if rows:
        lines += [
            "Paired differences ×100 (same seed; mean ± std over seeds; wins = seeds where the first row is ahead):",
            "",
            "| comparison | full NDCG@10 | NDCG@10 (1+99) |",
            "|---|---:|---:|",
            *rows,
            "",
        ]
    lines += stop_lines(found)
    lines += matched_lines(by, out, dataset)
    p3 = ("seq_local_text", "seq_central_shared_ids")  # the Local text -> Central references
    p10 = ("seq_local_text_p10", "seq_central_shared_ids_p10")
    m05 = "FeCoSR (server momentum 0.5, pre-training 150 rounds"
    for row, label, refs in (
        ("fecosr", "FeCoSR", p3),
        ("fecosr_long-pt", "FeCoSR with pre-training ≤ 150 rounds", p3),
        ("fecosr_m05_fixed-pt", m05 + ")", p3),
        ("fecosr_m05_fixed-pt", m05 + "; Local text and Central to convergence)", p10),
    ):
        gap = gap_closed(by, "full_ndcg@10", row, *refs)
        if gap:
            lines += [f"{label} closes {gap} on full NDCG@10.", ""]
    lines += transfer_lines(found, "full_ndcg@10")
    lines.append("")
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(found) + 1.5))
    y = np.arange(len(found))[::-1]
    means = [100 * m["average"]["full_ndcg@10"] for *_, m in found]
    stds = [100 * (m.get("average_std") or {}).get("full_ndcg@10", 0.0) for *_, m in found]
    ax.barh(y, means, xerr=stds, color=["#c44" if s.startswith("fecosr") else "#48a" for s, *_ in found])
    ax.set_yticks(y, [lab.replace("**", "") for _, lab, *_ in found])
    ax.set_xlabel("test full-ranking NDCG@10 ×100 (market mean, ± std over seeds)")
    ax.set_title(dataset, fontsize=10)
    run_dirs = [d for *_, d, _ in found]
    return lines + finish_dataset(
        fig, out, "fecosr", dataset, run_dirs, ("full_ndcg@10", "ndcg@10"), "market"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("merged", nargs="+", help="folders holding merged run folders named <dataset>_<row>")
    parser.add_argument("--out", required=True)
    parser.add_argument("--datasets", nargs="+", default=["movielens-age", "movielens-zip", "xmrec"])
    args = parser.parse_args()
    merged = [Path(m) for m in args.merged]
    missing = [str(m) for m in merged if not m.is_dir()]
    if missing:
        raise SystemExit(f"not a folder: {', '.join(missing)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for line in derive_first_phases(merged, args.datasets, out):
        print(line)
    if (out / "phase1").is_dir():
        merged.append(out / "phase1")
    lines = ["# FeCoSR comparison", ""]
    for dataset in args.datasets:
        lines += summarise(merged, dataset, out)
    if len(lines) == 2:
        raise SystemExit(
            f"no run folder named <dataset>_<row> for datasets {args.datasets} under {args.merged}"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(out / "summary.md")
    top = headline(merged, [d for d in args.datasets if d.startswith("movielens")])
    if top:
        (out / "headline.md").write_text("\n".join(top))
        print(out / "headline.md")


if __name__ == "__main__":
    main()
