"""Dual-codebook residual-quantized VAE (FedMM step 2, METHODS.md), in plain PyTorch.

An item's collaborative embedding x is encoded to a latent z = E(x) (default dim 32) and quantized in two
residual levels (RQ-VAE, Lee et al., CVPR 2022, eq. 2; as used for semantic IDs by TIGER, Rajput et al.,
NeurIPS 2023):

    c1 = argmin_k ‖z − G_k‖,          r = z − G_c1         (level 1: the *global* codebook G, federated)
    c2 = argmin_k ‖r − L_k‖,          ẑ = G_c1 + L_c2      (level 2: the market's *local* codebook L)
    x̂ = D(z + sg(ẑ − z))                                   (straight-through estimator)

    loss = ‖x − x̂‖² + Σ_levels ( ‖sg(r_l) − e_l‖² + β ‖r_l − sg(e_l)‖² ),  β = 0.25

with r_1 = z, e_1 = G_c1, r_2 = z − G_c1, e_2 = L_c2 (VQ-VAE, van den Oord et al., NeurIPS 2017, eq. 3).
Codebooks are learnable parameters (no EMA), so a codebook overwritten by a federated download stays
overwritten. Collapse guards: k-means initialisation (`kmeans`) and dead-code re-seeding
(`DualCodebookRQVAE.reseed_dead_codes`). `code_statistics` reports usage, perplexity and collisions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


def kmeans(
    points: torch.Tensor, k: int, iters: int = 20, weights: torch.Tensor | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means (k-means++ seeding, Lloyd iterations). Returns (centroids ``[k, d]``, weight per
    centroid ``[k]``).

    Fallback when there are fewer distinct points than ``k`` (a market too small to fill a codebook): every
    point becomes a centroid and the remaining centroids are jittered copies of random points; they start
    with zero weight, so usage-weighted merging ignores them until they attract items.
    """
    if points.ndim != 2 or len(points) == 0:
        raise ValueError(f"k-means needs a non-empty [n, d] tensor, got shape {tuple(points.shape)}")
    gen = torch.Generator().manual_seed(seed)
    n = len(points)
    w = torch.ones(n) if weights is None else weights.float().clamp_min(0)
    if float(w.sum()) <= 0:
        w = torch.ones(n)
    unique = torch.unique(points, dim=0)
    if len(unique) <= k:
        extra = unique[torch.randint(len(unique), (k - len(unique),), generator=gen)]
        scale = points.std().clamp_min(1e-3) * 0.01
        centroids = torch.cat([unique, extra + scale * torch.randn(extra.shape, generator=gen)])
        counts = torch.zeros(k)
        assign = torch.cdist(points, centroids[: len(unique)]).argmin(1)
        counts.index_add_(0, assign, w)
        return centroids, counts
    # k-means++ seeding (Arthur & Vassilvitskii, SODA 2007), weighted
    centroids = torch.empty(k, points.shape[1])
    centroids[0] = points[torch.multinomial(w, 1, generator=gen)]
    dist = torch.cdist(points, centroids[:1]).squeeze(1).pow(2)
    for j in range(1, k):
        probs = dist * w
        idx = torch.multinomial(probs if float(probs.sum()) > 0 else w, 1, generator=gen)
        centroids[j] = points[idx]
        dist = torch.minimum(dist, (points - centroids[j]).pow(2).sum(1))
    for _ in range(iters):
        assign = torch.cdist(points, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points * w[:, None])
        counts = torch.zeros(k).index_add_(0, assign, w)
        alive = counts > 0
        centroids[alive] = sums[alive] / counts[alive, None]
    assign = torch.cdist(points, centroids).argmin(1)
    counts = torch.zeros(k).index_add_(0, assign, w)
    return centroids, counts


def _mlp(dims: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DualCodebookRQVAE(nn.Module):
    """Encoder → level-1 global codebook → level-2 local codebook → decoder (see the module docstring)."""

    def __init__(
        self,
        input_dim: int,
        latent_dim: int = 32,
        hidden: Sequence[int] = (64,),
        global_codes: int = 256,
        local_codes: int = 256,
        beta: float = 0.25,
    ) -> None:
        super().__init__()
        if global_codes < 1 or local_codes < 1:
            raise ValueError(f"codebook sizes must be positive, got {global_codes} and {local_codes}")
        self.beta = beta
        self.encoder = _mlp([input_dim, *hidden, latent_dim])
        self.decoder = _mlp([latent_dim, *reversed(hidden), input_dim])
        self.global_codebook = nn.Parameter(torch.randn(global_codes, latent_dim) * 0.1)
        self.local_codebook = nn.Parameter(torch.randn(local_codes, latent_dim) * 0.1)

    @property
    def latent_dim(self) -> int:
        return self.global_codebook.shape[1]

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest-code residual quantization → (c1, c2, e1 = G_c1, e2 = L_c2)."""
        c1 = torch.cdist(z.detach(), self.global_codebook.detach()).argmin(1)
        e1 = self.global_codebook[c1]
        c2 = torch.cdist((z - e1).detach(), self.local_codebook.detach()).argmin(1)
        return c1, c2, e1, self.local_codebook[c2]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.encoder(x)
        c1, c2, e1, e2 = self.quantize(z)
        residual = z - e1
        z_hat = z + (e1 + e2 - z).detach()  # straight-through
        recon = self.decoder(z_hat)
        recon_loss = (recon - x).pow(2).sum(1).mean()
        codebook_loss = (z.detach() - e1).pow(2).sum(1).mean() + (residual.detach() - e2).pow(2).sum(1).mean()
        commit_loss = (z - e1.detach()).pow(2).sum(1).mean() + (residual - e2.detach()).pow(2).sum(1).mean()
        loss = recon_loss + codebook_loss + self.beta * commit_loss
        return {"loss": loss, "recon": recon_loss.detach(), "c1": c1, "c2": c2}

    @torch.no_grad()
    def encode(self, x: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents and codes of every row of ``x`` (batched, no grad) → (z, c1, c2)."""
        zs, c1s, c2s = [], [], []
        for s in range(0, len(x), chunk):
            z = self.encoder(x[s : s + chunk])
            c1, c2, _, _ = self.quantize(z)
            zs.append(z)
            c1s.append(c1)
            c2s.append(c2)
        return torch.cat(zs), torch.cat(c1s), torch.cat(c2s)

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, seed: int, init_global: bool = True) -> None:
        """k-means initialisation: G on the latents (unless it came from the server), L on the residuals."""
        z = self.encoder(x)
        if init_global:
            self.global_codebook.copy_(kmeans(z, len(self.global_codebook), seed=seed)[0])
        residual = z - self.global_codebook[torch.cdist(z, self.global_codebook).argmin(1)]
        self.local_codebook.copy_(kmeans(residual, len(self.local_codebook), seed=seed + 1)[0])

    @torch.no_grad()
    def reseed_dead_codes(self, x: torch.Tensor, seed: int, level: str = "local") -> int:
        """Move codes no item uses to random latents (level "global") or residuals (level "local").

        Returns how many codes were re-seeded. A re-seeded global code is reported with zero usage, so the
        server's usage-weighted merge does not take this market's value for it.
        """
        z, c1, c2 = self.encode(x)
        gen = torch.Generator().manual_seed(seed)
        if level == "global":
            book, used, targets = self.global_codebook, c1, z
        elif level == "local":
            book, used, targets = self.local_codebook, c2, z - self.global_codebook[c1]
        else:
            raise ValueError(f"level must be 'global' or 'local', got {level!r}")
        dead = torch.ones(len(book), dtype=torch.bool)
        dead[used.unique()] = False
        n_dead = int(dead.sum())
        if n_dead:
            pick = torch.randint(len(targets), (n_dead,), generator=gen)
            book[dead] = targets[pick] + 0.01 * targets.std() * torch.randn(
                n_dead, book.shape[1], generator=gen
            )
        return n_dead


def code_usage(codes: np.ndarray, num_codes: int) -> np.ndarray:
    """Items per code, ``[num_codes]`` float64."""
    return np.bincount(np.asarray(codes, dtype=np.int64), minlength=num_codes).astype(np.float64)


def code_statistics(c1: np.ndarray, c2: np.ndarray, global_codes: int, local_codes: int) -> dict[str, float]:
    """Usage (share of codes used), perplexity exp(H(p)) per level, and the collision rate: the share of
    items whose (c1, c2) pair is also another item's."""
    stats: dict[str, float] = {}
    for name, codes, k in (("g", c1, global_codes), ("l", c2, local_codes)):
        counts = code_usage(codes, k)
        p = counts / max(1.0, counts.sum())
        nz = p[p > 0]
        stats[f"usage_{name}"] = float((counts > 0).mean())
        stats[f"perplexity_{name}"] = float(math.exp(-(nz * np.log(nz)).sum()))
    pairs = np.asarray(c1, dtype=np.int64) * local_codes + np.asarray(c2, dtype=np.int64)
    _, inverse, counts = np.unique(pairs, return_inverse=True, return_counts=True)
    stats["collision_rate"] = float((counts[inverse] > 1).mean()) if len(pairs) else 0.0
    return stats
