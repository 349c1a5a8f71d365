"""Evaluation metrics shared by every method (METHODS.md, "Common protocol").

CTR: AUC, LogLoss and group AUC (GAUC, grouped by user). Ranking: HR@K, NDCG@K and MRR@K over the
1-positive + N-sampled-negatives candidate lists, and over the full market catalog minus the user's seen
items. Aggregation: mean ± std over seeds and the unweighted mean over markets.

Everything is vectorised (sorting, ``bincount``, torch index ops); there is no Python loop over users or
groups, so evaluating a large market each round stays cheap next to training.

Tie convention for ranking: the positive's rank is ``1 + #(other items scoring >= the positive)``. Ties
count *against* the positive, so a constant (or collapsed) model gets the worst possible rank instead of
the best one: a model that cannot tell items apart must not look good. (Ties in AUC are handled the usual
way, with average ranks, as scikit-learn does, so AUC of a constant model is 0.5.) NaN scores are treated
as ``-inf``: a diverged model ranks its positives last rather than first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from fedmarket.data.split import SeenItems


def lower_is_better(metric: str) -> bool:
    """Log loss and losses: lower is better; every other metric here (AUC, NDCG, HR, MRR): higher."""
    return "logloss" in metric or metric.endswith("loss")


__all__ = [
    "LOGLOSS_EPS",
    "average_over_markets",
    "candidate_ranking_metrics",
    "ctr_metrics",
    "full_ranking_metrics",
    "mean_std_over_seeds",
    "metrics_from_ranks",
]

LOGLOSS_EPS = 1e-7
"""Probabilities are clipped to ``[LOGLOSS_EPS, 1 - LOGLOSS_EPS]`` before the log: one confidently wrong
prediction then costs at most ``-log(1e-7) ≈ 16`` instead of infinity."""


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------------------------- CTR metrics


def _grouped_auc(labels: np.ndarray, scores: np.ndarray, group_ids: np.ndarray, num_groups: int):
    """AUC of every group at once via the Mann-Whitney U statistic on average ranks.

    Sort by (group, score); a tie block is a run of equal (group, score); every member of a block gets the
    block's average 1-based rank inside its group (what ``scipy.stats.rankdata(method="average")`` and
    scikit-learn's ``roc_auc_score`` do). Then ``AUC_g = (R_pos - P(P+1)/2) / (P·N)`` with ``R_pos`` the
    sum of positive ranks, P/N the group's positives/negatives.

    Returns (auc per group with NaN where a group has one class, instance count per group).
    """
    n = len(scores)
    order = np.lexsort((scores, group_ids))
    g_sorted = group_ids[order]
    s_sorted = scores[order]
    new_block = np.ones(n, dtype=bool)
    new_block[1:] = (g_sorted[1:] != g_sorted[:-1]) | (s_sorted[1:] != s_sorted[:-1])
    block_starts = np.flatnonzero(new_block)
    block_ends = np.append(block_starts[1:], n)
    counts = np.bincount(group_ids, minlength=num_groups)
    group_start = np.cumsum(counts) - counts  # first sorted position of each group
    # average of 1-based positions start+1..end, made relative to the group's first position
    block_rank = (block_starts + block_ends + 1) / 2.0 - group_start[g_sorted[block_starts]]
    ranks_sorted = np.repeat(block_rank, block_ends - block_starts)
    y_sorted = labels[order]
    pos = np.bincount(g_sorted, weights=y_sorted, minlength=num_groups)
    neg = counts - pos
    rank_sum = np.bincount(g_sorted, weights=ranks_sorted * y_sorted, minlength=num_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - pos * (pos + 1) / 2.0) / (pos * neg)
    auc[(pos == 0) | (neg == 0)] = np.nan
    return auc, counts


def ctr_metrics(
    labels: np.ndarray | torch.Tensor,
    probs: np.ndarray | torch.Tensor,
    groups: np.ndarray | torch.Tensor | None = None,
) -> dict[str, float]:
    """AUC, LogLoss and group AUC of click-probability predictions.

    Args:
        labels: 0/1 (or bool) per instance.
        probs: predicted probability per instance. AUC only uses the order, so logits work for AUC/GAUC,
            but LogLoss needs probabilities.
        groups: group key per instance (the user, for the usual GAUC); ``None`` gives ``gauc = nan``.
            The key is present either way so every run writes the same columns.

    Returns:
        ``{"auc", "logloss", "gauc"}``. ``auc`` is NaN when only one class is present. ``gauc`` is the
        mean of per-group AUCs weighted by each group's number of instances, over groups that contain
        both classes only: a group with only positives (or only negatives) has no pair to order, so it
        says nothing about ranking quality and is skipped rather than counted as 0 or 1. NaN when no
        group has both classes.

    Raises:
        ValueError: mismatched lengths, non-binary labels, or non-finite probabilities (a diverged model
            should fail loudly, not produce a plausible AUC).
    """
    y = _as_numpy(labels).astype(np.float64).ravel()
    p = _as_numpy(probs).astype(np.float64).ravel()
    if len(y) != len(p):
        raise ValueError(f"labels has {len(y)} entries, probs has {len(p)}")
    if len(y) == 0:
        raise ValueError("ctr_metrics needs at least one instance")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0/1")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"probs has {int((~np.isfinite(p)).sum())} non-finite values (NaN/Inf)")

    auc, _ = _grouped_auc(y, p, np.zeros(len(y), dtype=np.int64), 1)
    pc = np.clip(p, LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    logloss = float(-np.mean(y * np.log(pc) + (1.0 - y) * np.log1p(-pc)))

    gauc = float("nan")
    if groups is not None:
        g = _as_numpy(groups).ravel()
        if len(g) != len(y):
            raise ValueError(f"groups has {len(g)} entries, labels has {len(y)}")
        uniq, group_ids = np.unique(g, return_inverse=True)
        group_auc, counts = _grouped_auc(y, p, group_ids.astype(np.int64), len(uniq))
        valid = ~np.isnan(group_auc)
        if valid.any():
            gauc = float(np.sum(group_auc[valid] * counts[valid]) / np.sum(counts[valid]))
    return {"auc": float(auc[0]), "logloss": logloss, "gauc": gauc}


# ----------------------------------------------------------------------------------------- ranking metrics


def metrics_from_ranks(
    ranks: np.ndarray | torch.Tensor, ks: Iterable[int] = (5, 10, 20), prefix: str = ""
) -> dict[str, float]:
    """HR@K, NDCG@K and MRR@K averaged over users, from the 1-based rank of each user's single positive.

    With one relevant item the ideal DCG is 1, so NDCG@K = 1/log2(rank+1) if rank <= K else 0, and
    MRR@K = 1/rank if rank <= K else 0. Keys are ``f"{prefix}hr@{k}"`` etc. An empty ``ranks`` gives NaN.
    """
    r = _as_numpy(ranks).astype(np.float64).ravel()
    out: dict[str, float] = {}
    for k in ks:
        hit = r <= k
        if len(r) == 0:
            hr = ndcg = mrr = float("nan")
        else:
            hr = float(hit.mean())
            ndcg = float(np.where(hit, 1.0 / np.log2(r + 1.0), 0.0).mean())
            mrr = float(np.where(hit, 1.0 / r, 0.0).mean())
        out[f"{prefix}hr@{k}"] = hr
        out[f"{prefix}ndcg@{k}"] = ndcg
        out[f"{prefix}mrr@{k}"] = mrr
    return out


def candidate_ranking_metrics(
    scores: np.ndarray | torch.Tensor, ks: Iterable[int] = (5, 10, 20)
) -> dict[str, float]:
    """HR/NDCG/MRR@K over 1+N candidate lists (the cross-market literature's sampled protocol).

    Args:
        scores: ``[n_users, 1 + N]``, column 0 the held-out positive (as in ``EvalSet.candidates``),
            columns 1.. the sampled negatives.

    The positive's rank is ``1 + #(negatives scoring >= it)``: ties count against the positive so a
    constant model gets rank 1+N (HR@K = 0 for K <= N), never a flattering rank 1. NaN scores count as
    ``-inf``.
    """
    s = _as_numpy(scores).astype(np.float64)
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"scores must be [n_users, 1 + N] with N >= 1, got shape {s.shape}")
    s = np.where(np.isnan(s), -np.inf, s)
    ranks = 1 + np.count_nonzero(s[:, 1:] >= s[:, :1], axis=1)
    return metrics_from_ranks(ranks, ks)


def _csr_rows(seen: SeenItems, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row position in ``users``, item) for every seen item of every user in ``users``, without a loop.

    The CSR slices of arbitrary users are gathered by repeating each slice's start and adding a running
    offset inside the slice.
    """
    starts = seen.indptr[users]
    lengths = seen.indptr[users + 1] - starts
    total = int(lengths.sum())
    rows = np.repeat(np.arange(len(users), dtype=np.int64), lengths)
    offset_in_row = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, seen.indices[np.repeat(starts, lengths) + offset_in_row]


def full_ranking_metrics(
    score_fn: Callable[[np.ndarray], torch.Tensor | np.ndarray],
    users: np.ndarray,
    positives: np.ndarray,
    exclude: SeenItems,
    ks: Iterable[int] = (5, 10, 20),
    chunk_size: int = 1024,
    catalog: np.ndarray | None = None,
) -> dict[str, float]:
    """HR/NDCG/MRR@K of each user's held-out positive ranked against the market's whole catalog.

    Args:
        score_fn: ``score_fn(user_chunk)`` returns ``[len(user_chunk), num_items]`` scores (a torch tensor
            on any device, or a numpy array).
        users, positives: one held-out positive item per evaluated user (``EvalSet.users`` /
            ``EvalSet.positives``).
        exclude: items not to rank per user, normally the user's train items
            (``MarketSplit.seen_for(split)``).
        chunk_size: users scored at once; memory is ``chunk_size × num_items`` scores.
        catalog: bool per item, the items that may be ranked (``MarketSplit.catalog_mask``: under protocol 2
            the items with a train interaction); ``None``: every item.

    The positive's rank is ``1 + #(non-excluded items other than the positive scoring >= it)``: ties count
    against the positive (see the module docstring). Excluded items are masked out of that count (the
    same as setting their score to ``-inf``, but also exact when the positive itself scores ``-inf``).
    The positive is never excluded, even if it is in ``exclude``: with repeated interactions the held-out
    item can also be a train item, and dropping it would silently score that user as a miss for the
    method, whatever the model does.

    Returns keys prefixed ``full_`` (``full_hr@10``, ``full_ndcg@10``...), NaN when ``users`` is empty.
    """
    users = np.asarray(users, dtype=np.int64).ravel()
    positives = np.asarray(positives, dtype=np.int64).ravel()
    if len(users) != len(positives):
        raise ValueError(f"users has {len(users)} entries, positives has {len(positives)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    ranks = np.empty(len(users), dtype=np.int64)
    outside = None if catalog is None else torch.as_tensor(~np.asarray(catalog, dtype=bool))
    for start in range(0, len(users), chunk_size):
        chunk_users = users[start : start + chunk_size]
        chunk_pos = positives[start : start + chunk_size]
        with torch.no_grad():  # evaluation only: never build an autograd graph over a catalog
            scores = torch.as_tensor(score_fn(chunk_users)).detach()
        if scores.shape != (len(chunk_users), exclude.num_items):
            raise ValueError(
                f"score_fn returned shape {tuple(scores.shape)}, expected ({len(chunk_users)}, {exclude.num_items})"
            )
        if not scores.is_floating_point():
            scores = scores.float()
        device = scores.device
        scores = torch.where(torch.isnan(scores), torch.full_like(scores, -torch.inf), scores)
        row_index = torch.arange(len(chunk_users), device=device)
        pos_index = torch.as_tensor(chunk_pos, device=device)
        pos_scores = scores[row_index, pos_index].unsqueeze(1)
        beats = scores >= pos_scores
        if outside is not None and bool(outside.any()):
            beats[:, outside.to(device)] = False
        seen_rows, seen_items = _csr_rows(exclude, chunk_users)
        beats[torch.as_tensor(seen_rows, device=device), torch.as_tensor(seen_items, device=device)] = False
        beats[row_index, pos_index] = False  # the positive neither beats itself nor is ever excluded
        ranks[start : start + len(chunk_users)] = (1 + beats.sum(dim=1)).cpu().numpy()
    return metrics_from_ranks(ranks, ks, prefix="full_")


# ------------------------------------------------------------------------------------------- aggregation


def mean_std_over_seeds(
    per_seed: Sequence[Mapping[str, float]],
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and standard deviation of each metric over seeds.

    The std is the sample std (``ddof=1``), the honest spread estimate from the 3-5 seeds we run; with a
    single value it is 0 (no spread observed) rather than NaN, so tables stay readable. NaN values (a
    seed where the metric could not be computed) are ignored; a metric that is NaN in every seed stays
    NaN. Keys are the union over seeds, in first-seen order.
    """
    if len(per_seed) == 0:
        raise ValueError("mean_std_over_seeds needs at least one seed's metrics")
    keys = list(dict.fromkeys(k for d in per_seed for k in d))
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for key in keys:
        values = np.array([float(d[key]) for d in per_seed if key in d], dtype=np.float64)
        values = values[~np.isnan(values)]
        if len(values) == 0:
            mean[key] = std[key] = float("nan")
            continue
        mean[key] = float(values.mean())
        std[key] = float(values.std(ddof=1)) if len(values) >= 2 else 0.0
    return mean, std


def average_over_markets(per_market: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted (macro) mean of each metric over markets, ignoring NaN.

    Macro, not weighted by market size, because the question is how every market fares, small ones
    included (the cross-market literature reports it this way too). Keys are the union over markets.
    """
    keys = list(dict.fromkeys(k for d in per_market.values() for k in d))
    out: dict[str, float] = {}
    for key in keys:
        values = np.array([float(d[key]) for d in per_market.values() if key in d], dtype=np.float64)
        values = values[~np.isnan(values)]
        out[key] = float(values.mean()) if len(values) else float("nan")
    return out
