"""MMoE (Ma et al., KDD 2018) for CTR + CTCVR, with the expert groups of PF-MSMTrec's parameter template.

    x = [emb(field_1), …, emb(field_F), dense]                    (embeddings of categorical fields)
    e_i = Expert_i(x), Expert = (Linear → BatchNorm → ReLU → Dropout)ⁿ
    g_t = softmax(W_t x) over the experts task t sees               (one gate per task)
    h_t = Σ_i g_t,i e_i;  logit_t = Tower_t(h_t)
    ESMM (Ma et al., SIGIR 2018, default): p_CTR = σ(l_ctr), p_CTCVR = σ(l_ctr) · σ(l_cvr)
    direct: p_CTCVR = σ(l_ctcvr)

Expert groups (arXiv 2406.18938, "parameter template"; names are what the upload declarations match):

* ``experts_shared.<i>``: seen by every task, aggregated over all scenarios;
* ``experts_task.<task>.<i>``: seen by one task only, aggregated over scenarios per task;
* ``experts_scenario.<i>``: seen by every task, never leave the scenario.

Other names: ``embedding.<field>`` (``id_*`` = scenario-local IDs, ``feat_*`` = public vocabularies),
``gates.<task>`` (local in PF-MSMTrec), ``towers.<task>`` with tasks ``ctr`` and ``cvr`` (ESMM) or ``ctcvr``
(direct). Inside experts, ``linear<k>`` are the weights, ``bn<k>`` the BatchNorm layers (FedBN keeps them
local). Embeddings start at N(0, 0.01²): N(0, 1) left models badly undertrained on the proxy (DATA.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

TASKS = ("ctr", "ctcvr")


class Expert(nn.Module):
    """An MLP with BatchNorm: (linear<k> → bn<k> → ReLU → dropout) per hidden size."""

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0, batch_norm: bool = True):
        super().__init__()
        self.depth = len(hidden)
        self.batch_norm = batch_norm
        self.dropout = nn.Dropout(dropout)
        for k, h in enumerate(hidden):
            self.add_module(f"linear{k}", nn.Linear(in_dim, h))
            if batch_norm:
                self.add_module(f"bn{k}", nn.BatchNorm1d(h))
            in_dim = h
        self.out_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(self.depth):
            x = getattr(self, f"linear{k}")(x)
            if self.batch_norm:
                x = getattr(self, f"bn{k}")(x)
            x = self.dropout(torch.relu(x))
        return x


class Tower(nn.Module):
    """(linear<k> → ReLU → dropout)ⁿ → out: one logit."""

    def __init__(self, in_dim: int, hidden: Sequence[int], dropout: float = 0.0):
        super().__init__()
        self.depth = len(hidden)
        self.dropout = nn.Dropout(dropout)
        for k, h in enumerate(hidden):
            self.add_module(f"linear{k}", nn.Linear(in_dim, h))
            in_dim = h
        self.out = nn.Linear(in_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(self.depth):
            x = self.dropout(torch.relu(getattr(self, f"linear{k}")(x)))
        return self.out(x).squeeze(-1)


SEQUENTIAL_MIX_MAX = 4
"""Largest expert count mixed by `mix_experts`' sequential path (see there)."""


def mix_experts(gate: torch.Tensor, outs: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i gate[:, i] · outs[i], bit for bit what ``(gate.unsqueeze(-1) * torch.stack(outs, 1)).sum(1)`` gives.

    The stacked form materialises two ``[batch, experts, hidden]`` tensors forward and three backward (the
    broadcast products), about a quarter of a CPU training step of the small MMoEs used here. For up to
    `SEQUENTIAL_MIX_MAX` experts the sum is accumulated in expert order instead: PyTorch's CPU sum over the
    expert axis adds at most four terms left to right (its 4-way ILP split only starts with a fifth term),
    so the running sum ``((g0·e0 + g1·e1) + g2·e2) + g3·e3`` rounds the same way, and the gradients (the
    same products, the gate's reduced over the same contiguous hidden axis) are identical too
    (tests/test_mtl_perf_equivalence.py). With more experts the stacked form is used.
    """
    if len(outs) > SEQUENTIAL_MIX_MAX:
        return (gate.unsqueeze(-1) * torch.stack(outs, dim=1)).sum(1)
    g = gate.unsqueeze(-1)
    mixed = g[:, 0] * outs[0]
    for i in range(1, len(outs)):
        mixed = mixed + g[:, i] * outs[i]
    return mixed


class MMoE(nn.Module):
    """Multi-gate mixture of experts predicting (p_CTR, p_CTCVR).

    Args:
        fields: categorical field name → vocabulary size, in input column order.
        num_dense: number of dense (numerical) inputs appended after the embeddings.
        num_shared_experts / num_task_experts (per task) / num_scenario_experts: the expert groups.
        ctcvr_mode: ``"esmm"`` (p_CTCVR = p_CTR · p_CVR, default) or ``"direct"``.
    """

    def __init__(
        self,
        fields: dict[str, int],
        num_dense: int = 0,
        embed_dim: int = 16,
        num_shared_experts: int = 2,
        num_task_experts: int = 1,
        num_scenario_experts: int = 1,
        expert_hidden: Sequence[int] = (64, 32),
        tower_hidden: Sequence[int] = (32,),
        dropout: float = 0.1,
        batch_norm: bool = True,
        ctcvr_mode: str = "esmm",
        embed_init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if ctcvr_mode not in ("esmm", "direct"):
            raise ValueError(f"ctcvr_mode must be 'esmm' or 'direct', got {ctcvr_mode!r}")
        if num_shared_experts + num_task_experts + num_scenario_experts <= 0:
            raise ValueError("MMoE needs at least one expert")
        self.fields = dict(fields)
        self.ctcvr_mode = ctcvr_mode
        self.tower_tasks = ("ctr", "cvr") if ctcvr_mode == "esmm" else ("ctr", "ctcvr")
        self.embedding = nn.ModuleDict({name: nn.Embedding(size, embed_dim) for name, size in fields.items()})
        for table in self.embedding.values():
            nn.init.normal_(table.weight, std=embed_init_std)
        in_dim = embed_dim * len(fields) + num_dense
        self.input_dim = in_dim

        def expert() -> Expert:
            return Expert(in_dim, expert_hidden, dropout, batch_norm)

        self.experts_shared = nn.ModuleList([expert() for _ in range(num_shared_experts)])
        self.experts_task = nn.ModuleDict(
            {t: nn.ModuleList([expert() for _ in range(num_task_experts)]) for t in self.tower_tasks}
        )
        self.experts_scenario = nn.ModuleList([expert() for _ in range(num_scenario_experts)])
        per_task = num_shared_experts + num_task_experts + num_scenario_experts
        self.gates = nn.ModuleDict({t: nn.Linear(in_dim, per_task) for t in self.tower_tasks})
        out_dim = expert_hidden[-1] if expert_hidden else in_dim
        self.towers = nn.ModuleDict({t: Tower(out_dim, tower_hidden, dropout) for t in self.tower_tasks})

    def inputs(self, sparse: torch.Tensor, dense: torch.Tensor | None = None) -> torch.Tensor:
        parts = [table(sparse[:, i]) for i, table in enumerate(self.embedding.values())]
        if dense is not None and dense.shape[1]:
            parts.append(dense)
        return torch.cat(parts, dim=1)

    def forward(
        self, sparse: torch.Tensor, dense: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the logits of the two towers: (ctr, cvr) in ESMM mode, (ctr, ctcvr) in direct mode."""
        x = self.inputs(sparse, dense)
        common = [e(x) for e in self.experts_shared]
        scenario = [e(x) for e in self.experts_scenario]
        logits = []
        for task in self.tower_tasks:
            outs = common + [e(x) for e in self.experts_task[task]] + scenario
            gate = torch.softmax(self.gates[task](x), dim=1)
            logits.append(self.towers[task](mix_experts(gate, outs)))
        return logits[0], logits[1]

    def log_probs(
        self, sparse: torch.Tensor, dense: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log p_CTR, log(1−p_CTR), log p_CTCVR, log(1−p_CTCVR)), computed stably."""
        first, second = self(sparse, dense)
        f = nn.functional.logsigmoid
        ctr_pos, ctr_neg = f(first), f(-first)
        if self.ctcvr_mode == "esmm":
            ctcvr_pos = ctr_pos + f(second)
            # log(1 − p) = log1p(−exp(log p)), clamped away from 0 so the gradient stays finite
            ctcvr_neg = torch.log1p(-torch.exp(ctcvr_pos).clamp(max=1 - 1e-7))
        else:
            ctcvr_pos, ctcvr_neg = f(second), f(-second)
        return ctr_pos, ctr_neg, ctcvr_pos, ctcvr_neg

    def loss(
        self, sparse: torch.Tensor, dense: torch.Tensor | None, click: torch.Tensor, ctcvr: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(BCE on CTR, BCE on CTCVR), both over all impressions (ESMM's entire-space losses)."""
        ctr_pos, ctr_neg, ctcvr_pos, ctcvr_neg = self.log_probs(sparse, dense)
        ctr_loss = -(click * ctr_pos + (1 - click) * ctr_neg).mean()
        ctcvr_loss = -(ctcvr * ctcvr_pos + (1 - ctcvr) * ctcvr_neg).mean()
        return ctr_loss, ctcvr_loss

    @torch.no_grad()
    def predict(
        self, sparse: torch.Tensor, dense: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_CTR, p_CTCVR)."""
        ctr_pos, _, ctcvr_pos, _ = self.log_probs(sparse, dense)
        return ctr_pos.exp(), ctcvr_pos.exp()
