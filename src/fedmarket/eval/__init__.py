"""Evaluation: CTR and ranking metrics, and their aggregation over seeds and markets."""

from fedmarket.eval.metrics import (
    average_over_markets,
    candidate_ranking_metrics,
    ctr_metrics,
    full_ranking_metrics,
    mean_std_over_seeds,
    metrics_from_ranks,
)

__all__ = [
    "average_over_markets",
    "candidate_ranking_metrics",
    "ctr_metrics",
    "full_ranking_metrics",
    "mean_std_over_seeds",
    "metrics_from_ranks",
]
