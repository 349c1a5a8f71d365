"""FedMM's per-market features: what the RQ-VAE quantizes (`rqvae_input`) and each user's modal train
codes (`user_history_codes`, option ``user_codes=history``)."""

from __future__ import annotations

import numpy as np


def user_history_codes(users: np.ndarray, item_codes: np.ndarray, num_users: int, vocab: int) -> np.ndarray:
    """Per user, the most frequent code among the items of the user's interactions (``users[j]`` interacted
    with an item of code ``item_codes[j]``); ties → the smallest code; a user without interactions gets
    ``vocab`` (the reserved extra index). Returns ``[num_users]`` int64 in ``[0, vocab]``."""
    users = np.asarray(users, dtype=np.int64)
    item_codes = np.asarray(item_codes, dtype=np.int64)
    out = np.full(num_users, vocab, dtype=np.int64)
    if len(users) == 0:
        return out
    pairs, counts = np.unique(users * vocab + item_codes, return_counts=True)
    pair_users, pair_codes = pairs // vocab, pairs % vocab
    order = np.lexsort((pair_codes, -counts, pair_users))  # by user, then most frequent, then smallest code
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair_users[order][1:] != pair_users[order][:-1]
    out[pair_users[order][first]] = pair_codes[order][first]
    return out


def rqvae_input(embeddings: np.ndarray | None, stats: np.ndarray | None, stats_weight: float) -> np.ndarray:
    """What the RQ-VAE quantizes: standardised embeddings, statistics beside them (scaled), or either alone."""
    parts = []
    if embeddings is not None:
        parts.append((embeddings - embeddings.mean(0)) / np.maximum(embeddings.std(0), 1e-6))
    if stats is not None:
        parts.append(stats_weight * stats)
    return np.concatenate(parts, axis=1).astype(np.float32)
