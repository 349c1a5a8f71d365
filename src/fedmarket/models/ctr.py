"""CTR backbones over categorical fields: DeepFM and DCNv2, in plain PyTorch.

Every field (local user ID, local item ID, side features, FedMM codes...) has its own embedding table
named ``embedding.<field>`` so a method can declare, by name, which tables may leave a market (IDs never
do; a code table whose codes mean the same in every market may). Dense parts are ``dnn.*`` / ``cross.*``
and the output layer ``head.*``.

The contract shared by the CTR models (one evaluator serves them all):
- ``forward(x)`` with ``x`` a ``[B, F]`` long tensor of per-field indices → logits ``[B]``;
- ``score_matrix(user_x, item_x)`` with ``[U, Fu]`` user-side and ``[I, Fi]`` item-side fields (in the
  model's field order: user fields first) → logits ``[U, I]`` for every pair, for full-catalog ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

NUMERIC_PREFIX = "num_"
"""A field whose name starts with this is numeric: its column holds fixed-point values (value ·
`FIXED_POINT`, rounded) instead of codes, its tables have one row, and its embedding is value · v_f (its
first-order term value · w_f), the usual numeric-field embedding of FuxiCTR / DeepCTR."""
FIXED_POINT = 1 << 16


def is_numeric(field: str) -> bool:
    return field.startswith(NUMERIC_PREFIX)


def to_fixed_point(values) -> np.ndarray:
    """Real values → the int64 column a numeric field carries (clipped to ±10⁴)."""
    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), -1e4, 1e4)
    return np.round(values * FIXED_POINT).astype(np.int64)


class FieldEmbedding(nn.Module):
    """One embedding table and one first-order weight table per field (one row each for a numeric field)."""

    def __init__(self, fields: dict[str, int], embed_dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        if not fields:
            raise ValueError("at least one field is needed")
        for name, size in fields.items():
            if size <= 0:
                raise ValueError(f"field {name!r} has vocabulary size {size}; it must be positive")
        self.field_names = list(fields)
        rows = {f: 1 if is_numeric(f) else n for f, n in fields.items()}
        self.embedding = nn.ModuleDict({f: nn.Embedding(n, embed_dim) for f, n in rows.items()})
        self.linear = nn.ModuleDict({f: nn.Embedding(n, 1) for f, n in rows.items()})
        # N(0, 0.01): N(0, 1) left models badly undertrained in a first check (DATA.md)
        for table in list(self.embedding.values()):
            nn.init.normal_(table.weight, std=init_std)
        for table in list(self.linear.values()):
            nn.init.zeros_(table.weight)

    def forward(
        self, x: torch.Tensor, names: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: ``[..., F']`` indices of the fields in ``names`` (default all) → (``[..., F', D]``, ``[..., F']``)."""
        names = self.field_names if names is None else names
        embs, lins = [], []
        for i, f in enumerate(names):
            if is_numeric(f):
                value = (x[..., i].to(torch.float32) / FIXED_POINT).unsqueeze(-1)
                embs.append(value * self.embedding[f].weight[0])
                lins.append(value * self.linear[f].weight[0])
            else:
                embs.append(self.embedding[f](x[..., i]))
                lins.append(self.linear[f](x[..., i]))
        return torch.stack(embs, dim=-2), torch.cat(lins, dim=-1)


def _mlp(in_dim: int, hidden: Sequence[int], dropout: float, batch_norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers.append(nn.Linear(in_dim, h))
        if batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = h
    return nn.Sequential(*layers)


class CTRModel(nn.Module):
    """Shared plumbing: field embeddings, pairwise scoring for full-catalog ranking."""

    def __init__(self, fields: dict[str, int], num_user_fields: int, embed_dim: int) -> None:
        super().__init__()
        if not 1 <= num_user_fields < len(fields):
            raise ValueError(f"num_user_fields must be in [1, {len(fields) - 1}], got {num_user_fields}")
        self.fields = dict(fields)
        self.num_user_fields = num_user_fields
        self.embed_dim = embed_dim
        self.features = FieldEmbedding(fields, embed_dim)

    def interact(self, emb: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb, lin = self.features(x)
        return self.interact(emb, lin)

    @torch.no_grad()
    def score_matrix(
        self, user_x: torch.Tensor, item_x: torch.Tensor, pair_chunk: int = 1 << 13
    ) -> torch.Tensor:
        """Logits for every (user, item) pair, embedding each user and item once and broadcasting."""
        names = self.features.field_names
        u_emb, u_lin = self.features(user_x, names[: self.num_user_fields])
        i_emb, i_lin = self.features(item_x, names[self.num_user_fields :])
        num_users, num_items = len(user_x), len(item_x)
        out = torch.empty(num_users, num_items)
        users_per_chunk = max(1, pair_chunk // max(1, num_items))
        for s in range(0, num_users, users_per_chunk):
            ue, ul = u_emb[s : s + users_per_chunk], u_lin[s : s + users_per_chunk]
            n = len(ue)
            emb = torch.cat(
                [ue[:, None].expand(n, num_items, *ue.shape[1:]), i_emb[None].expand(n, *i_emb.shape)], dim=2
            )
            lin = torch.cat(
                [ul[:, None].expand(n, num_items, ul.shape[1]), i_lin[None].expand(n, *i_lin.shape)], dim=2
            )
            out[s : s + n] = self.interact(
                emb.reshape(n * num_items, *emb.shape[2:]), lin.reshape(n * num_items, -1)
            ).view(n, num_items)
        return out


class DeepFM(CTRModel):
    """DeepFM (Guo et al., IJCAI 2017): ŷ = w0 + Σ_i w_i + Σ_{i<j} <v_i, v_j> + MLP([v_1; ...; v_F]).

    The FM second-order term uses the identity Σ_{i<j}<v_i,v_j> = ½ (‖Σ v_i‖² − Σ ‖v_i‖²) (eq. 2).
    """

    def __init__(
        self,
        fields: dict[str, int],
        num_user_fields: int = 1,
        embed_dim: int = 16,
        hidden: Sequence[int] = (128, 64),
        dropout: float = 0.1,
    ) -> None:
        super().__init__(fields, num_user_fields, embed_dim)
        self.dnn = _mlp(len(fields) * embed_dim, hidden, dropout)
        self.head = nn.Linear(hidden[-1] if hidden else len(fields) * embed_dim, 1)
        self.bias = nn.Parameter(torch.zeros(1))

    @torch.no_grad()
    def score_matrix(
        self, user_x: torch.Tensor, item_x: torch.Tensor, pair_chunk: int = 1 << 13
    ) -> torch.Tensor:
        """All-pairs logits without materialising pair embeddings: the linear and FM terms split into a
        user part, an item part and one matrix product, and the first MLP layer splits as
        W [v_u; v_i] = W_u v_u + W_i v_i; only the later MLP layers run per pair."""
        if len(self.dnn) == 0:
            return super().score_matrix(user_x, item_x, pair_chunk)
        names = self.features.field_names
        u_emb, u_lin = self.features(user_x, names[: self.num_user_fields])
        i_emb, i_lin = self.features(item_x, names[self.num_user_fields :])
        su, si = u_emb.sum(1), i_emb.sum(1)
        user_part = self.bias + u_lin.sum(1) + 0.5 * (su.pow(2).sum(1) - u_emb.pow(2).sum((1, 2)))
        item_part = i_lin.sum(1) + 0.5 * (si.pow(2).sum(1) - i_emb.pow(2).sum((1, 2)))
        first: nn.Linear = self.dnn[0]
        split = u_emb.shape[1] * self.embed_dim
        a = u_emb.flatten(1) @ first.weight[:, :split].T + first.bias
        b = i_emb.flatten(1) @ first.weight[:, split:].T
        rest = self.dnn[1:]
        num_users, num_items = len(user_x), len(item_x)
        out = user_part[:, None] + item_part[None, :] + su @ si.T
        users_per_chunk = max(1, pair_chunk // max(1, num_items))
        for s in range(0, num_users, users_per_chunk):
            h = a[s : s + users_per_chunk, None, :] + b[None]
            out[s : s + len(h)] += self.head(rest(h)).squeeze(-1)
        return out

    def interact(self, emb: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
        square_of_sum = emb.sum(dim=1).pow(2)
        sum_of_square = emb.pow(2).sum(dim=1)
        fm = 0.5 * (square_of_sum - sum_of_square).sum(dim=1)
        deep = self.head(self.dnn(emb.flatten(1))).squeeze(-1)
        return self.bias + lin.sum(dim=1) + fm + deep


class CrossLayerV2(nn.Module):
    """DCN-V2 cross layer (Wang et al., WWW 2021, eq. 1): x_{l+1} = x_0 ⊙ (W x_l + b) + x_l."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


class DCNv2(CTRModel):
    """DCN-V2, stacked structure: cross network then deep network, then a linear head (plus first-order terms)."""

    def __init__(
        self,
        fields: dict[str, int],
        num_user_fields: int = 1,
        embed_dim: int = 16,
        num_cross_layers: int = 2,
        hidden: Sequence[int] = (128, 64),
        dropout: float = 0.1,
    ) -> None:
        super().__init__(fields, num_user_fields, embed_dim)
        dim = len(fields) * embed_dim
        self.cross = nn.ModuleList([CrossLayerV2(dim) for _ in range(num_cross_layers)])
        self.dnn = _mlp(dim, hidden, dropout)
        self.head = nn.Linear(hidden[-1] if hidden else dim, 1)
        self.bias = nn.Parameter(torch.zeros(1))

    def interact(self, emb: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
        x0 = emb.flatten(1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.bias + lin.sum(dim=1) + self.head(self.dnn(x)).squeeze(-1)


CTR_MODELS = {"deepfm": DeepFM, "dcnv2": DCNv2}


def build_ctr_model(name: str, fields: dict[str, int], num_user_fields: int, **options) -> CTRModel:
    if name not in CTR_MODELS:
        raise ValueError(f"unknown CTR model {name!r}; choose one of {sorted(CTR_MODELS)}")
    return CTR_MODELS[name](fields, num_user_fields=num_user_fields, **options)
