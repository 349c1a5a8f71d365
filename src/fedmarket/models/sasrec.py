"""SASRec over text-based (and/or ID-based) item representations (METHODS.md, FeCoSR step 2 and 5).

Item representation ``e_i`` (one row per item of the market's own catalog):

* text: a UniSRec-style adaptor over the frozen sentence vector t_i (Hou et al., KDD 2022, eq. 3-5):
  each of E experts is a parametric whitening ``(t_i − b_e) W_e``; a softmax gate ``g = softmax(t_i W_g)``
  mixes them, ``e_i = Σ_e g_e (t_i − b_e) W_e``. ``adaptor="mlp"`` uses one whitening + a 2-layer MLP.
* ID: a local embedding table; with text it is *added* to the text representation (FeCoSR's
  market-specific module, initialised at zero so fine-tuning starts from the pre-trained model).

Sequence encoder: SASRec (Kang & McAuley, ICDM 2018): e + position embedding, pre-LN causal Transformer
blocks, a final LayerNorm, and an optional bottleneck adapter ``h + U relu(D h)`` (U initialised at zero,
market-specific). Score of item j after a prefix = ⟨h_t, e_j⟩ over the market's own catalog (tied
input/output representations).

Sequences are left-padded with 0; item ``i`` is written ``i + 1``. Padded positions never receive a loss
(the caller selects real target positions) and real positions never attend to padding.

Parameter names matter: federated methods declare what leaves a market by these prefixes.
Shared backbone: ``adaptor.*``, ``position.*``, ``blocks.*``, ``final_norm.*``.
Market-local: ``id_embedding.*``, ``adapter.*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BACKBONE_PREFIXES = ("adaptor.", "position.", "blocks.", "final_norm.")
LOCAL_PREFIXES = ("id_embedding.", "adapter.")


class MoEAdaptor(nn.Module):
    """UniSRec's MoE adaptor: E parametric-whitening experts mixed by a softmax gate."""

    def __init__(self, in_dim: int, out_dim: int, num_experts: int = 4, dropout: float = 0.2) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_experts, in_dim))
        self.weight = nn.Parameter(torch.empty(num_experts, in_dim, out_dim))
        nn.init.normal_(self.weight, std=0.02)
        self.gate = nn.Linear(in_dim, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        x = self.dropout(text)
        gates = torch.softmax(self.gate(x), dim=-1)  # [N, E]
        # Σ_e g_e (x − b_e) W_e = Σ_e g_e x W_e − Σ_e g_e b_e W_e
        experts = torch.einsum("nd,edk->nek", x, self.weight) - torch.einsum(
            "ed,edk->ek", self.bias, self.weight
        )
        return (gates.unsqueeze(-1) * experts).sum(1)


class MLPAdaptor(nn.Module):
    """One parametric whitening followed by a 2-layer MLP."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(in_dim))
        self.net = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(in_dim, 2 * out_dim), nn.GELU(), nn.Linear(2 * out_dim, out_dim)
        )

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.net(text - self.bias)


class Block(nn.Module):
    """Pre-LN Transformer block with causal self-attention (scaled_dot_product_attention)."""

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, dim))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None, last_query: bool = False) -> torch.Tensor:
        """``last_query``: compute only the last position's output (keys/values still span the sequence);
        enough for the final block when only the state after the last item is needed (evaluation)."""
        b, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(dim, dim=-1)
        if last_query:
            q, x = q[:, -1:], x[:, -1:]
            attend = None if attend is None else attend[..., -1:, :]
        q = q.reshape(b, q.shape[1], self.heads, dim // self.heads).transpose(1, 2)
        k, v = (t.view(b, length, self.heads, dim // self.heads).transpose(1, 2) for t in (k, v))
        p = self.dropout if self.training else 0.0
        # no padding in the batch (attend None): the fused causal kernel, much faster than a boolean mask
        causal = attend is None and not last_query
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=p, is_causal=causal)
        x = x + F.dropout(self.proj(a.transpose(1, 2).reshape(b, x.shape[1], dim)), p, self.training)
        return x + F.dropout(self.ff(self.norm2(x)), p, self.training)


class BottleneckAdapter(nn.Module):
    """``h + U relu(D h)`` with U = 0 at start (Houlsby et al., ICML 2019): a no-op until trained."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.relu(self.down(h)))


class SASRec(nn.Module):
    """SASRec with text and/or ID item representations; see the module docstring.

    Args:
        num_items: size of the market's catalog.
        text_vectors: ``[num_items, text_dim]`` frozen sentence vectors, or None (ID-only).
        use_id: add a local ID embedding (``id_init_std`` = 0 starts it at zero: FeCoSR's fine-tune module).
        adapter_dim: bottleneck size of the local adapter (0 = none).
    """

    def __init__(
        self,
        num_items: int,
        text_vectors: torch.Tensor | None = None,
        *,
        hidden_dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        max_len: int = 50,
        ff_dim: int | None = None,
        dropout: float = 0.2,
        adaptor: str = "moe",
        num_experts: int = 4,
        use_id: bool = False,
        id_init_std: float = 0.02,
        adapter_dim: int = 0,
    ) -> None:
        super().__init__()
        if text_vectors is None and not use_id:
            raise ValueError("SASRec needs text vectors, an ID embedding, or both")
        self.num_items = num_items
        self.max_len = max_len
        self.hidden_dim = hidden_dim
        self.dropout = dropout
        # shared modules first, so every market draws identical initial backbone weights from one seed
        if text_vectors is not None:
            text_vectors = torch.as_tensor(text_vectors, dtype=torch.float32)
            if text_vectors.shape[0] != num_items:
                raise ValueError(f"text_vectors has {text_vectors.shape[0]} rows for {num_items} items")
            if adaptor == "moe":
                self.adaptor: nn.Module | None = MoEAdaptor(
                    text_vectors.shape[1], hidden_dim, num_experts, dropout
                )
            elif adaptor == "mlp":
                self.adaptor = MLPAdaptor(text_vectors.shape[1], hidden_dim, dropout)
            else:
                raise ValueError(f"adaptor must be 'moe' or 'mlp', got {adaptor!r}")
            # market data, not a parameter: never in state_dict, so never in a payload
            self.register_buffer("text_vectors", text_vectors, persistent=False)
        else:
            self.adaptor = None
            self.text_vectors = None
        self.position = nn.Embedding(max_len, hidden_dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.blocks = nn.ModuleList(
            Block(hidden_dim, num_heads, ff_dim or 4 * hidden_dim, dropout) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden_dim)
        # market-local modules last
        self.id_embedding: nn.Embedding | None = None
        if use_id:
            self.id_embedding = nn.Embedding(num_items, hidden_dim)
            if id_init_std > 0:
                nn.init.normal_(self.id_embedding.weight, std=id_init_std)
            else:
                nn.init.zeros_(self.id_embedding.weight)
        self.adapter = BottleneckAdapter(hidden_dim, adapter_dim) if adapter_dim > 0 else None

    # ------------------------------------------------------------------ representations
    def item_table(self) -> torch.Tensor:
        """``[num_items, d]`` item representations e_i of the market's catalog."""
        table = None
        if self.adaptor is not None:
            table = self.adaptor(self.text_vectors)
        if self.id_embedding is not None:
            table = self.id_embedding.weight if table is None else table + self.id_embedding.weight
        return table

    def encode(
        self, inputs: torch.Tensor, table: torch.Tensor | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Hidden states ``[B, L, d]`` of left-padded sequences ``inputs`` (item + 1, 0 = padding);
        ``last_only``: ``[B, 1, d]``, the state after the last item only (the final block skips the rest)."""
        if table is None:
            table = self.item_table()
        padded = torch.cat([table.new_zeros(1, table.shape[1]), table])
        length = inputs.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        x = padded[inputs] + self.position.weight[self.max_len - length :]
        x = F.dropout(x, self.dropout, self.training)
        real = inputs > 0
        attend = None  # no padding: plain causal attention
        if not bool(real.all()):
            causal = torch.ones(length, length, dtype=torch.bool, device=inputs.device).tril()
            # a query attends to earlier real items; a padding query attends to itself only (no empty rows)
            eye = torch.eye(length, dtype=torch.bool, device=inputs.device)
            attend = ((causal & real[:, None, :]) | eye).unsqueeze(1)  # [B, 1, L, L]
        for i, block in enumerate(self.blocks):
            x = block(x, attend, last_query=last_only and i == len(self.blocks) - 1)
        h = self.final_norm(x)
        if self.adapter is not None:
            h = self.adapter(h)
        return h

    def last_state(self, inputs: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """The state after each sequence's last item (left padding: the last column), ``[B, d]``."""
        return self.encode(inputs, table, last_only=True)[:, -1]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith(BACKBONE_PREFIXES)]

    def local_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith(LOCAL_PREFIXES)]
