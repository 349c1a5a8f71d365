"""Collaborative embedding models trained locally inside one market (FedMM step 1, METHODS.md).

- `MFBPR`: matrix factorisation trained with BPR (Rendle et al., UAI 2009, eq. 6):
  max Σ_(u,i,j) ln σ(x̂_ui − x̂_uj) − λ‖Θ‖², with x̂_ui = <p_u, q_i>.
- `LightGCN` (He et al., SIGIR 2020, eqs. 3-4): embeddings propagated over the normalised user-item graph,
  e^(k+1) = D^-½ A D^-½ e^(k), final embedding = mean over layers 0..K, trained with the same BPR loss.

Both see only the market's train interactions and return item (and user) embeddings as numpy arrays; the
embeddings never leave the market (only what FedMM quantizes them into does, and only the global codebook).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedmarket.data.split import SeenItems, sample_train_negatives


class MFBPR(nn.Module):
    """x̂_ui = <p_u, q_i> (Rendle et al. 2009)."""

    def __init__(self, num_users: int, num_items: int, dim: int = 32, init_std: float = 0.1) -> None:
        super().__init__()
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_items, dim)
        nn.init.normal_(self.user.weight, std=init_std)
        nn.init.normal_(self.item.weight, std=init_std)

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user.weight, self.item.weight


class LightGCN(nn.Module):
    """LightGCN: layer-mean of embeddings propagated on the symmetric-normalised bipartite graph."""

    def __init__(
        self,
        num_users: int,
        num_items: int,
        users: np.ndarray,
        items: np.ndarray,
        dim: int = 32,
        layers: int = 2,
    ) -> None:
        super().__init__()
        self.num_users, self.layers = num_users, layers
        self.embedding = nn.Embedding(num_users + num_items, dim)
        nn.init.normal_(self.embedding.weight, std=0.1)
        pairs = np.unique(np.stack([users, items + num_users], axis=1), axis=0)
        rows = np.concatenate([pairs[:, 0], pairs[:, 1]])
        cols = np.concatenate([pairs[:, 1], pairs[:, 0]])
        n = num_users + num_items
        degree = np.bincount(rows, minlength=n).astype(np.float32)
        inv_sqrt = np.where(degree > 0, degree**-0.5, 0.0).astype(np.float32)
        values = inv_sqrt[rows] * inv_sqrt[cols]
        self.register_buffer(
            "adjacency",
            torch.sparse_coo_tensor(
                np.stack([rows, cols]), values, (n, n), check_invariants=False
            ).coalesce(),
            persistent=False,
        )

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.embedding.weight
        total = e
        for _ in range(self.layers):
            e = torch.sparse.mm(self.adjacency, e)
            total = total + e
        final = total / (self.layers + 1)
        return final[: self.num_users], final[self.num_users :]


def train_collaborative_embeddings(
    kind: str,
    users: np.ndarray,
    items: np.ndarray,
    num_users: int,
    num_items: int,
    *,
    dim: int = 32,
    epochs: int = 30,
    lr: float = 0.01,
    reg: float = 1e-4,
    batch_size: int = 2048,
    layers: int = 2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Train MF-BPR (``kind="mf"``) or LightGCN (``kind="lightgcn"``) on (user, item) train pairs.

    Returns ``(user_embeddings [U, dim], item_embeddings [I, dim])``. One sampled negative per positive
    (uniform over the user's non-train items), reseeded per epoch from ``seed``.
    """
    if kind not in ("mf", "lightgcn"):
        raise ValueError(f"collaborative model must be 'mf' or 'lightgcn', got {kind!r}")
    if len(users) == 0:
        raise ValueError("no train interactions to learn collaborative embeddings from")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model: MFBPR | LightGCN
    if kind == "mf":
        model = MFBPR(num_users, num_items, dim)
    else:
        model = LightGCN(num_users, num_items, users, items, dim, layers)
    seen = SeenItems.build(users, items, num_users, num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    users_t, items_t = torch.from_numpy(users.astype(np.int64)), torch.from_numpy(items.astype(np.int64))
    for _ in range(epochs):
        negatives = torch.from_numpy(sample_train_negatives(users, seen, num_items, 1, rng)[:, 0])
        perm = torch.from_numpy(rng.permutation(len(users)))
        for s in range(0, len(users), batch_size):
            idx = perm[s : s + batch_size]
            user_emb, item_emb = model.embeddings()
            p, qi, qj = user_emb[users_t[idx]], item_emb[items_t[idx]], item_emb[negatives[idx]]
            diff = (p * qi).sum(-1) - (p * qj).sum(-1)
            loss = (
                -torch.nn.functional.logsigmoid(diff).mean()
                + reg * (p.pow(2) + qi.pow(2) + qj.pow(2)).sum(-1).mean()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        user_emb, item_emb = model.embeddings()
    return user_emb.detach().numpy().copy(), item_emb.detach().numpy().copy()
