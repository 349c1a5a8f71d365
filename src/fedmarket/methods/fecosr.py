"""FeCoSR: federated collaboration for cross-market sequential recommendation ("From Transfer to
Collaboration: A Federated Framework for Cross-Market Sequential Recommendation", arXiv 2604.13573;
reconstruction in METHODS.md, "FeCoSR").

What leaves a market (declared once, here): during federated pre-training, the weights of the text-based
sequence encoder, i.e. the text adaptor and the Transformer (``adaptor.*``, ``position.*``, ``blocks.*``,
``final_norm.*``). During local fine-tuning: NOTHING (the client uploads an empty payload; asserted in
``tests/test_fecosr.py``). Never: interactions, item text or text vectors, the local ID embedding, the
bottleneck adapter.

Algorithm (rounds 1..R, ``F = method.options.federated_rounds``):

1. Item representation e_i = Adaptor(t_i) over frozen all-MiniLM-L6-v2 vectors t_i of the market's own
   catalog (`fedmarket.models.text_encoder`, `fedmarket.models.sasrec`).
2. Federated pre-training, rounds 1..F. Client step: ``local_epochs`` epochs of S²CE
   (1 − λ)·CE + λ·soft-CE with q_j ∝ exp(cos(t_target, t_j)/τ) (`fedmarket.methods.s2ce`) on the market's
   own sequences; upload the backbone. Server step: FedAvg, θ ← Σ_k (n_k / n) θ_k with n_k the market's
   number of train targets (``server_lr`` η_g ≠ 1: θ ← θ + η_g (Σ_k (n_k / n) θ_k − θ), server SGD;
   ``server_momentum``, ``server_optimizer`` adam/yogi: `fedmarket.federation.strategies.ServerStep`).
3. Local fine-tuning, rounds F+1..R. Round F+1 downloads the final global backbone; then each market
   trains alone with its market-specific module (a local item-ID embedding added to e_i, starting at zero,
   and a bottleneck adapter after the Transformer, starting as the identity), CE by default
   (``finetune_loss``), the backbone at ``backbone_lr_scale × lr``. The server receives nothing.

Ablations are options of this method: ``loss: ce`` (FeCoSR with CE = FedAvg-CE + fine-tune),
``federated_rounds: 0`` or ``>= train.rounds`` (FeCoSR without fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmarket.federation.payload import UploadDeclaration
from fedmarket.federation.strategies import FedAvgThenLocal
from fedmarket.methods.base import Method, register
from fedmarket.methods.seq_trainer import SeqOptions, seq_clients

TEXT_BACKBONE_UPLOAD = UploadDeclaration(
    ("adaptor.*", "position.*", "blocks.*", "final_norm.*"),
    "text adaptor + Transformer during federated pre-training; nothing during local fine-tuning "
    "(ID embeddings, adapter, item text and interactions stay local)",
)


def federated_then_local(opts: SeqOptions) -> FedAvgThenLocal:
    """The strategy of every FedAvg-family sequential method, from its options (federated rounds, server step)."""
    return FedAvgThenLocal(opts.federated_rounds, **opts.server_step_kwargs())


@dataclass
class FeCoSROptions(SeqOptions):
    loss: str = "s2ce"
    federated_rounds: int = 10


def build_fecosr(cfg, opts: FeCoSROptions, splits, seed):
    clients = seq_clients(cfg, opts, splits, seed, TEXT_BACKBONE_UPLOAD, use_text=True)
    return clients, federated_then_local(opts)


register(
    Method(
        "fecosr",
        TEXT_BACKBONE_UPLOAD,
        build_fecosr,
        FeCoSROptions,
        task="seq",
        summary="FeCoSR: federated text-SASRec pre-training with S²CE, then local fine-tuning (uploads nothing)",
    )
)
