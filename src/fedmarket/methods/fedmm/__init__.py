"""FedMM: federated collaborative signal quantization for multi-market CTR prediction
("FedMM: Federated Collaborative Signal Quantization for Multi-Market CTR Prediction", arXiv 2605.11433,
SIGIR 2026; only the abstract is public, this is the reconstruction of docs/METHODS.md, "FedMM").

The algorithm, in the order this package implements it. The server round number picks the phase:

    rounds 1..R_e              EMBED  per market, collaborative item embeddings x_i (MF-BPR or LightGCN,
                                      trained locally in one round; or route "fedctr": the item-ID
                                      embeddings of a CTR model whose dense layers are FedAvg'd for R_e rounds)
    rounds R_e+1..R_e+R_q      RQVAE  per market, a dual-codebook RQ-VAE quantizes x_i (optionally with
                                      market-comparable item statistics beside it) into (c1, c2); the
                                      level-1 codebook G is federated: upload (G_m, n_m), the server merges
                                      code by code, G_k ← Σ_m n_mk G_mk / Σ_m n_mk
    rounds R_e+R_q+1..R        CTR    DeepFM / DCNv2 with (c1, c2) as extra item fields (and, option
                                      user_codes=history, the user's modal train (c1, c2) as (u1, u2) user
                                      fields); the c1 (and u1) embedding table and the dense layers are
                                      FedAvg'd (option), IDs and c2 (u2) stay local

Default route (docs/results_fedmm.md): the RQ-VAE quantizes market-comparable item statistics instead of
collaborative embeddings (``item_stats="only"``), with the encoder/decoder federated next to G; codes of
collaborative embeddings alone agree across markets only at chance level on XMarket.

What may leave a market is declared once, in `FEDMM_UPLOAD` (`options`); `upload_declaration(options)` narrows
it to what a given configuration actually sends (`Method.declaration_for`): the runtimes enforce that
narrowed declaration, and the trainer builds its uploads from it.
With secure aggregation on (and no DP), the RQ-VAE rounds after the first upload (u·G, u, n·θ) with weight
1 instead of (G, u, θ) with weight n, so the server's merge needs only their sums (`merge_codebook_sums`);
the first merge clusters the markets' centroids and stays in the clear.
Everything ID-indexed (user/item embeddings, ID tables of the CTR model, item statistics, codes) stays.

Ablations (options): ``codebook="local"`` (no codebook federation), ``codebook="global_only"`` (both levels
federated); alignment routes: ``embedding="fedctr"``, ``item_stats="concat"|"only"``,
``federate_autoencoder=true``; user fields: ``user_codes="history"``. `code_alignment` is the analysis-only
diagnostic (it reads raw item keys, which no federated step ever does).

Modules: `options` (options, what leaves a market, the round schedule), `features` (what the RQ-VAE
quantizes, users' history codes), `client` (`FedMMClient`, one market's trainer), `server` (`FedMMStrategy`
and the codebook merges), `analysis` (code alignment of a finished run; analysis only). This module builds
the method and registers it; every public name is importable from ``fedmarket.methods.fedmm``.
"""

from __future__ import annotations

import logging

from fedmarket.data.split import MarketSplit
from fedmarket.methods.base import Method, register
from fedmarket.methods.ctr_baselines import ctr_client_kwargs
from fedmarket.methods.fedmm.analysis import alignment_from_run, code_alignment
from fedmarket.methods.fedmm.client import FedMMClient
from fedmarket.methods.fedmm.features import rqvae_input, user_history_codes
from fedmarket.methods.fedmm.options import (
    CODE_TABLES,
    CTR_DENSE,
    FEDMM_UPLOAD,
    GLOBAL_CODEBOOK,
    GLOBAL_CODEBOOK_X_USAGE,
    GLOBAL_USAGE,
    LOCAL_CODEBOOK,
    LOCAL_CODEBOOK_X_USAGE,
    LOCAL_USAGE,
    WEIGHTED_AUTOENCODER,
    WEIGHTED_BOOKS,
    FedMMOptions,
    Schedule,
    upload_declaration,
)
from fedmarket.methods.fedmm.server import FedMMStrategy, merge_codebook_sums, merge_codebooks
from fedmarket.methods.item_stats import item_statistics

__all__ = [
    "CODE_TABLES",
    "CTR_DENSE",
    "FEDMM_UPLOAD",
    "GLOBAL_CODEBOOK",
    "GLOBAL_CODEBOOK_X_USAGE",
    "GLOBAL_USAGE",
    "LOCAL_CODEBOOK",
    "LOCAL_CODEBOOK_X_USAGE",
    "LOCAL_USAGE",
    "WEIGHTED_AUTOENCODER",
    "WEIGHTED_BOOKS",
    "FedMMClient",
    "FedMMOptions",
    "FedMMStrategy",
    "Schedule",
    "alignment_from_run",
    "build_fedmm",
    "code_alignment",
    "item_statistics",
    "merge_codebook_sums",
    "merge_codebooks",
    "rqvae_input",
    "upload_declaration",
    "user_history_codes",
    "uses_secure_sums",
]

log = logging.getLogger(__name__)


def uses_secure_sums(cfg) -> bool:
    """Secure aggregation makes the RQ-VAE rounds after the first a sum of weighted uploads; under DP the
    markets' updates are deltas from the download instead (the DP wrappers), so it stays off there."""
    return cfg.secure_aggregation.enabled and cfg.privacy.mode == "off"


def build_fedmm(cfg, opts: FedMMOptions, splits: dict[str, MarketSplit], seed: int):
    schedule = Schedule.from_options(opts, cfg.train.rounds)
    kwargs = ctr_client_kwargs(cfg, seed)
    secure_sums = uses_secure_sums(cfg)
    untimed = [n for n, s in splits.items() if s.market.meta.get("time") == "file row"]
    if untimed and opts.item_stats != "none":
        log.warning(
            "FedMM: markets %s have no timestamps; the first/median/last-seen item statistics fall back to "
            "positions in the file (row numbers), which mean nothing across markets",
            untimed,
        )
    trainers = {
        name: FedMMClient(split, opts, schedule, kwargs, cfg.model.use_side_features, secure_sums)
        for name, split in splits.items()
    }
    return trainers, FedMMStrategy(opts, schedule, seed, secure_sums)


register(
    Method(
        "fedmm",
        FEDMM_UPLOAD,
        build_fedmm,
        FedMMOptions,
        summary="FedMM: federated level-1 RQ-VAE codebook, codes into the CTR model",
        declare=lambda cfg, opts: upload_declaration(opts, uses_secure_sums(cfg), cfg.model.name),
    )
)
