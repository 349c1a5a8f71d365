"""Aggregators: pure functions over payloads (no state, no I/O), so they are easy to test and reuse
under the in-process runtime and under Flower."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmarket.federation.payload import Payload


def weighted_mean(payloads: Sequence[Payload], weights: Sequence[float]) -> Payload:
    """FedAvg (McMahan et al. 2017, eq. in Alg. 1): θ = Σ_k (n_k / n) θ_k, key by key."""
    if not payloads:
        raise ValueError("weighted_mean needs at least one payload")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(w)}")
    w = w / w.sum()
    keys = payloads[0].keys()
    out: Payload = {}
    for key in keys:
        acc = sum(wk * np.asarray(p[key], dtype=np.float64) for wk, p in zip(w, payloads, strict=True))
        out[key] = np.asarray(acc, dtype=np.asarray(payloads[0][key]).dtype)
    return out


def coordinate_median(payloads: Sequence[Payload]) -> Payload:
    """Coordinate-wise median (Yin et al. 2018): robust to a minority of poisoned markets."""
    keys = payloads[0].keys()
    return {
        k: np.median(np.stack([p[k] for p in payloads]), axis=0).astype(payloads[0][k].dtype) for k in keys
    }


def trimmed_mean(payloads: Sequence[Payload], trim_ratio: float = 0.1) -> Payload:
    """Coordinate-wise trimmed mean: drop the ``trim_ratio`` largest and smallest values per coordinate."""
    if not 0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    n = len(payloads)
    cut = int(np.floor(trim_ratio * n))
    out: Payload = {}
    for key in payloads[0]:
        stacked = np.sort(np.stack([p[key] for p in payloads]), axis=0)
        out[key] = stacked[cut : n - cut].mean(axis=0).astype(payloads[0][key].dtype)
    return out
