"""Dual-codebook RQ-VAE, k-means, code statistics and the collaborative embedding models."""

import numpy as np
import pytest
import torch

from fedmarket.models.collab import train_collaborative_embeddings
from fedmarket.models.rqvae import DualCodebookRQVAE, code_statistics, kmeans


def blobs(n_per: int = 50, centers: int = 8, dim: int = 6, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(centers, dim, generator=gen) * 5
    return (means[:, None] + 0.1 * torch.randn(centers, n_per, dim, generator=gen)).reshape(-1, dim)


def test_kmeans_finds_separated_blobs():
    x = blobs()
    centroids, counts = kmeans(x, 8, seed=1)
    assert centroids.shape == (8, 6)
    assert sorted(counts.tolist()) == [50.0] * 8


def test_kmeans_with_fewer_points_than_codes_falls_back():
    """A market too small to fill a codebook: every point is a centroid, the extra codes start unused."""
    x = torch.randn(5, 4)
    centroids, counts = kmeans(x, 16)
    assert centroids.shape == (16, 4)
    assert torch.isfinite(centroids).all()
    assert counts.sum() == 5 and (counts > 0).sum() == 5


def test_rqvae_trains_codes_and_reseeds_dead_codes():
    torch.manual_seed(0)
    x = blobs(30, 8, 6)
    model = DualCodebookRQVAE(6, latent_dim=4, hidden=(16,), global_codes=8, local_codes=4)
    model.init_codebooks(x, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    first = None
    for _ in range(150):
        out = model(x)
        first = first if first is not None else float(out["recon"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["recon"]) < 0.5 * first
    _, c1, c2 = model.encode(x)
    assert c1.max() < 8 and c2.max() < 4
    with torch.no_grad():
        model.global_codebook[3] = 1e6  # a code nobody can use
    assert model.reseed_dead_codes(x, seed=0, level="global") >= 1
    assert model.global_codebook.abs().max() < 1e5


def test_code_statistics():
    c1 = np.array([0, 0, 1, 2])
    c2 = np.array([0, 0, 1, 1])
    stats = code_statistics(c1, c2, global_codes=4, local_codes=2)
    assert stats["usage_g"] == 0.75 and stats["usage_l"] == 1.0
    assert stats["collision_rate"] == 0.5  # items 0 and 1 share (0, 0)
    assert stats["perplexity_l"] == pytest.approx(2.0)


@pytest.mark.parametrize("kind", ["mf", "lightgcn"])
def test_collaborative_embeddings_rank_train_items_above_random(kind):
    rng = np.random.default_rng(0)
    # two user groups, each interacting only with its own half of the items
    users = np.repeat(np.arange(40), 6)
    items = np.where(users < 20, rng.integers(0, 20, len(users)), rng.integers(20, 40, len(users)))
    user_emb, item_emb = train_collaborative_embeddings(kind, users, items, 40, 40, dim=8, epochs=40, seed=0)
    assert user_emb.shape == (40, 8) and item_emb.shape == (40, 8)
    scores = user_emb @ item_emb.T
    own = np.where(np.arange(40)[:, None] < 20, np.arange(40)[None] < 20, np.arange(40)[None] >= 20)
    assert scores[own].mean() > scores[~own].mean()
