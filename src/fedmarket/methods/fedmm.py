"""FedMM: federated collaborative signal quantization for multi-market CTR prediction
("FedMM: Federated Collaborative Signal Quantization for Multi-Market CTR Prediction", arXiv 2605.11433,
SIGIR 2026; only the abstract is public, this is the reconstruction of docs/METHODS.md, "FedMM").

The algorithm, in the order this module implements it. The server round number picks the phase:

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

What may leave a market is declared once, in `FEDMM_UPLOAD` below; `upload_declaration(options)` narrows
it to what a given configuration actually sends (`Method.declaration_for`): the runtimes enforce that
narrowed declaration, and the trainer builds its uploads from it.
With secure aggregation on (and no DP), the RQ-VAE rounds after the first upload (u·G, u, n·θ) with weight
1 instead of (G, u, θ) with weight n, so the server's merge needs only their sums (`merge_codebook_sums`);
the first merge clusters the markets' centroids and stays in the clear.
Everything ID-indexed (user/item embeddings, ID tables of the CTR model, item statistics, codes) stays.

Ablations (options): ``codebook="local"`` (no codebook federation), ``codebook="global_only"`` (both levels
federated); alignment routes: ``embedding="fedctr"``, ``item_stats="concat"|"only"``,
``federate_autoencoder=true``; user fields: ``user_codes="history"``. `code_alignment` is the analysis-only diagnostic (it reads raw item keys,
which no federated step ever does).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmarket.checkpoint import load_state
from fedmarket.config import load_run_config
from fedmarket.data.prepare import prepare_data
from fedmarket.data.split import MarketSplit, market_seed
from fedmarket.errors import ConfigError, PayloadError
from fedmarket.federation.aggregators import weighted_mean
from fedmarket.federation.core import ClientTrainer, MarketMetrics, RoundConfig, Strategy, Update
from fedmarket.federation.payload import Payload, UploadDeclaration
from fedmarket.methods.base import Method, ServerStepOptions, register
from fedmarket.methods.ctr_baselines import ctr_client_kwargs
from fedmarket.methods.ctr_trainer import CTRClient, CTRData
from fedmarket.methods.item_stats import ITEM_STAT_NAMES, item_statistics
from fedmarket.models.collab import train_collaborative_embeddings
from fedmarket.models.rqvae import DualCodebookRQVAE, code_statistics, code_usage, kmeans

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- what leaves a market
GLOBAL_CODEBOOK = "rqvae.global_codebook"  # [K1, d] level-1 codebook G (step 3)
GLOBAL_USAGE = "rqvae.global_usage"  # [K1] items per level-1 code: the merge weights
LOCAL_CODEBOOK = "rqvae.local_codebook"  # only codebook="global_only" (ablation)
LOCAL_USAGE = "rqvae.local_usage"
# secure aggregation (RQ-VAE rounds after the first merge): the sums a market contributes, weight 1 each, so
# that the server's merge needs only Σ over markets (see `FedMMClient.secure_sums`, `merge_codebook_sums`)
GLOBAL_CODEBOOK_X_USAGE = "rqvae.global_codebook_x_usage"  # [K1, d] u[k] · G[k]
LOCAL_CODEBOOK_X_USAGE = "rqvae.local_codebook_x_usage"  # only codebook="global_only"
WEIGHTED_AUTOENCODER = "rqvae.weighted."  # + encoder.* / decoder.*: n · θ, n = the market's items = Σ_k u[k]
WEIGHTED_BOOKS = {GLOBAL_CODEBOOK: GLOBAL_CODEBOOK_X_USAGE, LOCAL_CODEBOOK: LOCAL_CODEBOOK_X_USAGE}
FEDMM_UPLOAD = UploadDeclaration(
    (
        GLOBAL_CODEBOOK,
        GLOBAL_USAGE,
        LOCAL_CODEBOOK,  # ablation global_only
        LOCAL_USAGE,  # ablation global_only
        "rqvae.encoder.*",  # route federate_autoencoder
        "rqvae.decoder.*",  # route federate_autoencoder
        GLOBAL_CODEBOOK_X_USAGE,  # secure aggregation: u·G instead of G
        LOCAL_CODEBOOK_X_USAGE,  # secure aggregation with global_only
        "rqvae.weighted.encoder.*",  # secure aggregation with federate_autoencoder: n·θ instead of θ
        "rqvae.weighted.decoder.*",
        "embed.dnn.*",  # route embedding=fedctr: dense layers of the embedding CTR model
        "embed.cross.*",
        "embed.head.*",
        "embed.bias",
        "ctr.features.embedding.c1.weight",  # the c1 code table: c1 means the same in every market
        "ctr.features.linear.c1.weight",
        "ctr.features.embedding.c2.weight",  # only ctr_federation=codes_dense (with global_only)
        "ctr.features.linear.c2.weight",
        "ctr.features.embedding.u1.weight",  # user_codes=history: indexed by global code, like c1
        "ctr.features.linear.u1.weight",
        "ctr.features.embedding.u2.weight",  # user_codes=history with ctr_federation=codes_dense
        "ctr.features.linear.u2.weight",
        "ctr.dnn.*",
        "ctr.cross.*",
        "ctr.head.*",
        "ctr.bias",
    ),
    "level-1 codebook + per-code usage counts; optionally the code tables and dense layers of the CTR "
    "model; user/item IDs, their embeddings, item statistics and codes stay local",
    # RQ-VAE rounds: reconstruction loss and code-usage diagnostics (shares, perplexities, collision rate)
    metrics=("recon", "usage_g", "usage_l", "perplexity_g", "perplexity_l", "collision_rate"),
)
CTR_DENSE = ("dnn.*", "cross.*", "head.*", "bias")
CODE_TABLES = {
    f: (f"features.embedding.{f}.weight", f"features.linear.{f}.weight") for f in ("c1", "c2", "u1", "u2")
}


@dataclass
class FedMMOptions(ServerStepOptions):
    """``method.options`` of FedMM (defaults = the FedMM row of the comparison)."""

    embedding: str = "mf"  # mf | lightgcn | fedctr   (step 1; unused with item_stats="only")
    embedding_dim: int = 32  # mf / lightgcn
    embedding_epochs: int = 30
    embedding_rounds: int = 3  # fedctr only: FedAvg rounds of the embedding CTR model
    # default: the RQ-VAE quantizes market-comparable item statistics only (the alignment route that won the
    # comparison in docs/results_fedmm.md); "none" = collaborative embeddings only (FedMM as first specified)
    item_stats: str = "only"  # none | concat | only
    stats_weight: float = 1.0
    stats_scaling: str = "market"  # market | calendar (see item_statistics)
    rqvae_rounds: int = 5  # R_q
    rqvae_epochs: int = 10  # local epochs per RQ-VAE round
    rqvae_lr: float = 0.001
    rqvae_batch_size: int = 256
    latent_dim: int = 32
    rqvae_hidden: list[int] = dataclasses.field(default_factory=lambda: [64])
    global_codes: int = 256  # |G|
    local_codes: int = 256  # |L_m|
    beta: float = 0.25
    codebook: str = "federated"  # federated (G shared, L local) | local | global_only
    server_init: str = "kmeans"  # kmeans: merge local k-means centroids by weighted k-means | first
    federate_autoencoder: bool = True  # alignment route (default on)
    ctr_federation: str = "c1_dense"  # none | dense | c1_dense | codes_dense
    # user_codes: "none" (default) | "history". With "history" every user also gets (u1, u2) = the most
    # frequent c1 and the most frequent c2 among the items of the user's TRAIN interactions (ties → the
    # smallest code; a user with no train interaction gets the reserved index global_codes / local_codes),
    # two more categorical user fields of the CTR model (training, candidate scoring and full ranking).
    # Federation: the u1/u2 tables are indexed by code, not by user ID, and u1 lives in the GLOBAL code space
    # (u1 = k means "this user mostly interacts with items of global code k" in every market), so the u1
    # table is federated exactly when the c1 table is (ctr_federation c1_dense / codes_dense) and u2 exactly
    # when c2 is (codes_dense, i.e. codebook=global_only); otherwise they stay local. The reserved row
    # ("no train history") means the same everywhere too and is averaged with the rest. The per-user codes
    # themselves, like the item codes, never leave the market.
    user_codes: str = "none"

    def validate(self, prefix: str) -> None:
        self.validate_server_step(prefix)
        choices = {
            "embedding": ("mf", "lightgcn", "fedctr"),
            "item_stats": ("none", "concat", "only"),
            "stats_scaling": ("calendar", "market"),
            "codebook": ("federated", "local", "global_only"),
            "server_init": ("kmeans", "first"),
            "ctr_federation": ("none", "dense", "c1_dense", "codes_dense"),
            "user_codes": ("none", "history"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"{prefix}.{key} must be one of {list(allowed)}, got {getattr(self, key)!r}"
                )
        for key in (
            "embedding_dim",
            "embedding_epochs",
            "embedding_rounds",
            "rqvae_rounds",
            "rqvae_epochs",
            "rqvae_batch_size",
            "latent_dim",
            "global_codes",
            "local_codes",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{prefix}.{key} must be > 0, got {getattr(self, key)}")
        if self.rqvae_lr <= 0 or self.beta < 0 or self.stats_weight < 0:
            raise ConfigError(f"{prefix}: rqvae_lr must be > 0, beta and stats_weight >= 0")
        if self.ctr_federation == "codes_dense" and self.codebook != "global_only":
            raise ConfigError(
                f"{prefix}.ctr_federation=codes_dense needs codebook=global_only (c2 is local otherwise)"
            )


def upload_declaration(opts: FedMMOptions, secure_sums: bool = False) -> UploadDeclaration:
    """The subset of `FEDMM_UPLOAD` that this configuration sends (the runtime checks against the full one);
    ``secure_sums``: secure aggregation is on (see `FedMMClient.secure_sums`)."""
    keys: list[str] = []
    if opts.codebook in ("federated", "global_only"):
        keys += [GLOBAL_CODEBOOK, GLOBAL_USAGE]
    if opts.codebook == "global_only":
        keys += [LOCAL_CODEBOOK, LOCAL_USAGE]
    if opts.federate_autoencoder:
        keys += ["rqvae.encoder.*", "rqvae.decoder.*"]
    if secure_sums and opts.codebook in ("federated", "global_only"):
        keys += [WEIGHTED_BOOKS[k] for k in (GLOBAL_CODEBOOK, LOCAL_CODEBOOK) if k in keys]
        if opts.federate_autoencoder:
            keys += [f"{WEIGHTED_AUTOENCODER}encoder.*", f"{WEIGHTED_AUTOENCODER}decoder.*"]
    if opts.embedding == "fedctr":
        keys += [f"embed.{p}" for p in CTR_DENSE]
    if opts.ctr_federation != "none":
        keys += [f"ctr.{p}" for p in CTR_DENSE]
    user = opts.user_codes == "history"
    if opts.ctr_federation in ("c1_dense", "codes_dense"):
        keys += [f"ctr.{k}" for f in ("c1", "u1")[: 1 + user] for k in CODE_TABLES[f]]
    if opts.ctr_federation == "codes_dense":
        keys += [f"ctr.{k}" for f in ("c2", "u2")[: 1 + user] for k in CODE_TABLES[f]]
    assert all(FEDMM_UPLOAD.allows(k.replace("*", "x")) for k in keys), keys
    return UploadDeclaration(tuple(keys), FEDMM_UPLOAD.reason, FEDMM_UPLOAD.metrics)


# ----------------------------------------------------------------------------- the round schedule
@dataclass(frozen=True)
class Schedule:
    embed_rounds: int
    rqvae_rounds: int
    total_rounds: int

    @classmethod
    def from_options(cls, opts: FedMMOptions, total_rounds: int) -> Schedule:
        embed = opts.embedding_rounds if opts.embedding == "fedctr" else 1
        if total_rounds <= embed + opts.rqvae_rounds:
            raise ConfigError(
                f"train.rounds={total_rounds} leaves no CTR round after {embed} embedding round(s) and "
                f"method.options.rqvae_rounds={opts.rqvae_rounds}; set train.rounds > {embed + opts.rqvae_rounds}"
            )
        return cls(embed, opts.rqvae_rounds, total_rounds)

    def phase(self, server_round: int) -> tuple[str, int]:
        """(phase, 0-based round inside the phase) of a 1-based server round."""
        if server_round <= self.embed_rounds:
            return "embed", server_round - 1
        if server_round <= self.embed_rounds + self.rqvae_rounds:
            return "rqvae", server_round - self.embed_rounds - 1
        return "ctr", server_round - self.embed_rounds - self.rqvae_rounds - 1

    def uploads_sums(self, opts: FedMMOptions, secure_sums: bool, server_round: int) -> bool:
        """Whether markets upload the weighted sums (u·G, u, n·θ; weight 1) in ``server_round``: with secure
        aggregation on, in every RQ-VAE round after the first (the first merge clusters the markets' local
        k-means centroids, which is not a sum) of a configuration that federates a codebook. Client and
        server both decide from the round number alone."""
        phase, step = self.phase(server_round)
        return secure_sums and phase == "rqvae" and step >= 1 and opts.codebook != "local"


def _with_prefix(payload: Payload, prefix: str) -> Payload:
    return {f"{prefix}{k}": v for k, v in payload.items()}


def _strip_prefix(payload: Payload | None, prefix: str) -> Payload:
    return {k[len(prefix) :]: v for k, v in (payload or {}).items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- step 1: item inputs
def user_history_codes(users: np.ndarray, item_codes: np.ndarray, num_users: int, vocab: int) -> np.ndarray:
    """Per user, the most frequent code among the items of the user's interactions (``users[j]`` interacted
    with an item of code ``item_codes[j]``); ties → the smallest code; a user without interactions gets
    ``vocab`` (the reserved extra index). Returns ``[num_users]`` int64 in ``[0, vocab]``."""
    users = np.asarray(users, dtype=np.int64)
    item_codes = np.asarray(item_codes, dtype=np.int64)
    out = np.full(num_users, vocab, dtype=np.int64)
    if len(users) == 0:
        return out
    pairs, counts = np.unique(users * vocab + item_codes, return_counts=True)
    pair_users, pair_codes = pairs // vocab, pairs % vocab
    order = np.lexsort((pair_codes, -counts, pair_users))  # by user, then most frequent, then smallest code
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair_users[order][1:] != pair_users[order][:-1]
    out[pair_users[order][first]] = pair_codes[order][first]
    return out


def rqvae_input(embeddings: np.ndarray | None, stats: np.ndarray | None, stats_weight: float) -> np.ndarray:
    """What the RQ-VAE quantizes: standardised embeddings, statistics beside them (scaled), or either alone."""
    parts = []
    if embeddings is not None:
        parts.append((embeddings - embeddings.mean(0)) / np.maximum(embeddings.std(0), 1e-6))
    if stats is not None:
        parts.append(stats_weight * stats)
    return np.concatenate(parts, axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- the client
class FedMMClient(ClientTrainer):
    """One market's FedMM trainer: collaborative embeddings → dual-codebook RQ-VAE → CTR with codes."""

    def __init__(
        self,
        split: MarketSplit,
        opts: FedMMOptions,
        schedule: Schedule,
        ctr_kwargs: dict,
        use_side: bool,
        secure_sums: bool = False,
    ):
        self.market = split.name
        self.split = split
        self.opts = opts
        self.schedule = schedule
        self.seed = int(ctr_kwargs.get("seed", 0))
        # secure aggregation on (and no DP): RQ-VAE rounds after the first upload weighted sums, weight 1
        self.secure_sums = secure_sums
        self.upload_keys = upload_declaration(opts, secure_sums)
        num_items = split.market.num_items
        zeros = np.zeros(num_items, dtype=np.int64)
        codes = {"c1": (zeros, opts.global_codes), "c2": (zeros, opts.local_codes)}
        user_codes = None
        if opts.user_codes == "history":  # + 1: the reserved index of users without train interactions
            user_zeros = np.zeros(split.market.num_users, dtype=np.int64)
            user_codes = {"u1": (user_zeros, opts.global_codes + 1), "u2": (user_zeros, opts.local_codes + 1)}
        ctr_declaration = UploadDeclaration(
            tuple(_strip_prefix({k: 0 for k in self.upload_keys.patterns}, "ctr."))
        )
        self.ctr = CTRClient(
            self.market, CTRData.from_split(split, use_side, codes, user_codes), ctr_declaration, **ctr_kwargs
        )
        self.code_columns = (self.ctr.data.item_x.shape[1] - 2, self.ctr.data.item_x.shape[1] - 1)
        self.user_code_columns = (self.ctr.data.user_x.shape[1] - 2, self.ctr.data.user_x.shape[1] - 1)
        self.embed_ctr: CTRClient | None = None
        if opts.embedding == "fedctr":
            embed_declaration = UploadDeclaration(CTR_DENSE)
            self.embed_ctr = CTRClient(
                self.market, CTRData.from_split(split, use_side), embed_declaration, **ctr_kwargs
            )
        emb_dim = (
            0
            if opts.item_stats == "only"
            else (self.embed_ctr.model.embed_dim if self.embed_ctr is not None else opts.embedding_dim)
        )
        input_dim = emb_dim + (len(ITEM_STAT_NAMES) if opts.item_stats != "none" else 0)
        # same seed in every market: a federated encoder/decoder starts identical everywhere
        torch.manual_seed(int(market_seed(self.seed, "__rqvae__").generate_state(1)[0]))
        self.rqvae = DualCodebookRQVAE(
            input_dim,
            opts.latent_dim,
            tuple(opts.rqvae_hidden),
            opts.global_codes,
            opts.local_codes,
            opts.beta,
        )
        self.item_embeddings: np.ndarray | None = None
        self.item_input: torch.Tensor | None = None
        self.codes: tuple[np.ndarray, np.ndarray] | None = None
        self.phase = "embed"
        self.recon = float("nan")

    # ---------------------------------------------------------------- federation plumbing
    def initial_payload(self) -> Payload:
        payload: Payload = _with_prefix(self.ctr.initial_payload(), "ctr.")
        if self.embed_ctr is not None:
            payload.update(_with_prefix(self.embed_ctr.initial_payload(), "embed."))
        payload.update(self._rqvae_upload(np.zeros(self.opts.global_codes), np.zeros(self.opts.local_codes)))
        # a codebook with zero usage means "not initialised yet": each market starts from local k-means
        return {k: v for k, v in payload.items() if self.upload_keys.allows(k)}

    def _rqvae_upload(self, usage_g: np.ndarray, usage_l: np.ndarray) -> Payload:
        state = {f"rqvae.{k}": v.detach().cpu().numpy().copy() for k, v in self.rqvae.state_dict().items()}
        state[GLOBAL_USAGE] = usage_g.astype(np.float32)
        state[LOCAL_USAGE] = usage_l.astype(np.float32)
        return {k: v for k, v in state.items() if self.upload_keys.allows(k)}

    def _weighted_upload(self, upload: Payload) -> Payload:
        """The sums this market contributes to a secure RQ-VAE merge: u[k]·G[k] per code and u (per level),
        n·θ for the encoder/decoder with n = its items = Σ_k u_global[k] (the weight of the plain merge).
        Uploaded with weight 1, the server's sums over markets give Σ u·G / Σ u and Σ n·θ / Σ n exactly."""
        n = float(np.asarray(upload[GLOBAL_USAGE], dtype=np.float64).sum())
        usage_of = {GLOBAL_CODEBOOK: GLOBAL_USAGE, LOCAL_CODEBOOK: LOCAL_USAGE}
        out: Payload = {}
        for key, value in upload.items():
            value = np.asarray(value)
            if key in WEIGHTED_BOOKS:
                usage = np.asarray(upload[usage_of[key]], dtype=np.float64)
                out[WEIGHTED_BOOKS[key]] = (usage[:, None] * value.astype(np.float64)).astype(value.dtype)
            elif key.startswith(("rqvae.encoder.", "rqvae.decoder.")):
                out[WEIGHTED_AUTOENCODER + key[len("rqvae.") :]] = (n * value.astype(np.float64)).astype(
                    value.dtype
                )
            else:  # the usage counts themselves
                out[key] = value
        return out

    def _load_rqvae(self, payload: Payload) -> tuple[bool, bool]:
        """Load a downloaded codebook / autoencoder. Returns whether G and L came initialised."""
        with torch.no_grad():
            for key, value in payload.items():
                if key.startswith(("rqvae.encoder.", "rqvae.decoder.")):
                    self.rqvae.state_dict()[key[len("rqvae.") :]].copy_(torch.as_tensor(value))
            got = []
            for book_key, usage_key, param in (
                (GLOBAL_CODEBOOK, GLOBAL_USAGE, self.rqvae.global_codebook),
                (LOCAL_CODEBOOK, LOCAL_USAGE, self.rqvae.local_codebook),
            ):
                ok = book_key in payload and float(np.asarray(payload.get(usage_key, 0)).sum()) > 0
                if ok:
                    book = torch.as_tensor(np.asarray(payload[book_key]), dtype=param.dtype)
                    if book.shape != param.shape:
                        raise PayloadError(
                            f"market {self.market!r}: downloaded {book_key} has shape {tuple(book.shape)}, "
                            f"this market's codebook is {tuple(param.shape)}"
                        )
                    param.copy_(book)
                got.append(ok)
        return got[0], got[1]

    # ---------------------------------------------------------------- one round
    def fit(self, payload: Payload, config: RoundConfig) -> Update:
        phase, step = self.schedule.phase(config.round)
        self.phase = phase
        if phase == "embed":
            return self.fit_embeddings(payload, config)
        if phase == "rqvae":
            return self.fit_rqvae(payload, config, step)
        return self.fit_ctr(payload, config)

    def fit_embeddings(self, payload: Payload, config: RoundConfig) -> Update:
        """Step 1: collaborative item embeddings, trained on this market's train interactions only."""
        split = self.split
        if self.opts.item_stats == "only":  # the RQ-VAE reads statistics only: no embedding to learn
            return Update({}, len(split.train_users), {})
        if self.embed_ctr is None:
            _, self.item_embeddings = train_collaborative_embeddings(
                self.opts.embedding,
                split.train_users,
                split.train_items,
                split.market.num_users,
                split.market.num_items,
                dim=self.opts.embedding_dim,
                epochs=self.opts.embedding_epochs,
                seed=int(market_seed(config.seed, self.market, 7).generate_state(1)[0]),
            )
            return Update({}, len(split.train_users), {})
        update = self.embed_ctr.fit(_strip_prefix(payload, "embed."), config)
        self.item_embeddings = self.embed_ctr.model.features.embedding["item"].weight.detach().numpy().copy()
        return Update(_with_prefix(update.payload, "embed."), update.num_examples, update.metrics)

    def _build_item_input(self) -> torch.Tensor:
        stats = (
            item_statistics(self.split, self.opts.stats_scaling) if self.opts.item_stats != "none" else None
        )
        emb = None if self.opts.item_stats == "only" else self.item_embeddings
        if emb is None and stats is None:
            raise RuntimeError("FedMM: the RQ-VAE phase started before the embedding phase")
        return torch.from_numpy(rqvae_input(emb, stats, self.opts.stats_weight))

    def fit_rqvae(self, payload: Payload, config: RoundConfig, step: int) -> Update:
        """Steps 2-3: train the RQ-VAE locally on the downloaded G; upload (G, usage) (eq. in the docstring)."""
        seed = int(market_seed(config.seed, self.market, config.round).generate_state(1)[0])
        have_global, have_local = self._load_rqvae(payload)
        if self.item_input is None:
            self.item_input = self._build_item_input()
            self.rqvae.init_codebooks(self.item_input, seed, init_global=not have_global)
        x = self.item_input
        gen = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(self.rqvae.parameters(), lr=self.opts.rqvae_lr)
        self.rqvae.train()
        recon = []
        for _ in range(self.opts.rqvae_epochs * config.local_epochs):
            perm = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x), self.opts.rqvae_batch_size):
                out = self.rqvae(x[perm[s : s + self.opts.rqvae_batch_size]])
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                optimizer.step()
                recon.append(float(out["recon"]))
        _, c1, c2 = self.rqvae.encode(x)
        usage_g = code_usage(c1.numpy(), self.opts.global_codes)
        usage_l = code_usage(c2.numpy(), self.opts.local_codes)
        # dead-code re-seeding: levels this market owns alone; dead *global* codes are re-seeded by the server
        if self.opts.codebook != "global_only":
            self.rqvae.reseed_dead_codes(x, seed, "local")
        if self.opts.codebook == "local":
            self.rqvae.reseed_dead_codes(x, seed + 1, "global")
        self.recon = float(np.mean(recon)) if recon else float("nan")
        metrics = {
            "recon": self.recon,
            **code_statistics(c1.numpy(), c2.numpy(), self.opts.global_codes, self.opts.local_codes),
        }
        upload = self._rqvae_upload(usage_g, usage_l)
        if self.schedule.uploads_sums(self.opts, self.secure_sums, config.round):
            return Update(self._weighted_upload(upload), 1, metrics)  # weight 1: the sums carry the weights
        return Update(upload, len(x), metrics)

    def assign_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """Step 4: (c1, c2) for every item of the market, written into the CTR model's item fields."""
        _, c1, c2 = self.rqvae.encode(self.item_input)
        self.codes = (c1.numpy().astype(np.int64), c2.numpy().astype(np.int64))
        self._write_codes()
        return self.codes

    def user_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """Option user_codes=history: (u1, u2) per user, the modal c1 / c2 over the user's train
        interactions (see `user_history_codes`); derived from the item codes and train split only."""
        assert self.codes is not None
        split = self.split
        n = split.market.num_users
        return (
            user_history_codes(
                split.train_users, self.codes[0][split.train_items], n, self.opts.global_codes
            ),
            user_history_codes(split.train_users, self.codes[1][split.train_items], n, self.opts.local_codes),
        )

    def _write_codes(self) -> None:
        assert self.codes is not None
        self.ctr.data.item_x[:, self.code_columns[0]] = torch.from_numpy(self.codes[0])
        self.ctr.data.item_x[:, self.code_columns[1]] = torch.from_numpy(self.codes[1])
        if self.opts.user_codes == "history":
            u1, u2 = self.user_codes()
            self.ctr.data.user_x[:, self.user_code_columns[0]] = torch.from_numpy(u1)
            self.ctr.data.user_x[:, self.user_code_columns[1]] = torch.from_numpy(u2)

    def fit_ctr(self, payload: Payload, config: RoundConfig) -> Update:
        """Step 4: CTR with the codes as categorical fields; upload the declared CTR parameters (FedAvg)."""
        if self.codes is None:
            if self.item_input is None:
                raise RuntimeError("FedMM: the CTR phase started before the RQ-VAE phase")
            self._load_rqvae(payload)  # the first CTR round brings the final merged G
            self.assign_codes()
        update = self.ctr.fit(_strip_prefix(payload, "ctr."), config)
        return Update(_with_prefix(update.payload, "ctr."), update.num_examples, update.metrics)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, payload: Payload | None, split: str, full_ranking: bool = False) -> MarketMetrics:
        """CTR phase: AUC, LogLoss, gAUC, ranking metrics. Earlier phases: code diagnostics only (no ``auc``
        key, so the runtime never selects a pre-CTR round as the best one)."""
        if self.phase == "ctr" and self.codes is not None:
            return self.ctr.evaluate(_strip_prefix(payload, "ctr."), split, full_ranking)
        if self.phase == "rqvae" and self.item_input is not None:
            self._load_rqvae(payload or {})
            _, c1, c2 = self.rqvae.encode(self.item_input)
            stats = code_statistics(c1.numpy(), c2.numpy(), self.opts.global_codes, self.opts.local_codes)
            return {self.market: {"recon": self.recon, **stats}}
        return {self.market: {}}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "ctr": self.ctr.state_dict(),
            "embed_ctr": self.embed_ctr.state_dict() if self.embed_ctr is not None else None,
            "rqvae": self.rqvae.state_dict(),
            "item_embeddings": self.item_embeddings,
            "item_input": self.item_input,
            "codes": self.codes,
            "recon": self.recon,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase = state["phase"]
        self.ctr.load_state_dict(state["ctr"])
        if self.embed_ctr is not None and state["embed_ctr"] is not None:
            self.embed_ctr.load_state_dict(state["embed_ctr"])
        self.rqvae.load_state_dict(state["rqvae"])
        self.item_embeddings = state["item_embeddings"]
        self.item_input = state["item_input"]
        self.codes = state["codes"]
        self.recon = state["recon"]
        if self.codes is not None:
            self._write_codes()

    def export_model(self, market: str):
        """The CTR model with the codes in its item (and user) fields, for serving; None before the CTR phase."""
        return self.ctr.export_model(market) if self.phase == "ctr" and self.codes is not None else None


# ----------------------------------------------------------------------------- the server
def merge_codebooks(
    uploads: dict[str, tuple[np.ndarray, np.ndarray]],
    previous: np.ndarray | None,
    *,
    init: str = "kmeans",
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Step 3, server side. ``uploads``: market → (codebook ``[K, d]``, usage ``[K]``).

    - If no market's codebook has been merged yet (``previous`` is None), codes of different markets do not
      correspond: with ``init="kmeans"`` the server clusters all uploaded codes into K global codes by
      usage-weighted k-means (merging local k-means centroids weighted by counts); with ``"first"`` it takes
      the largest market's codebook.
    - Otherwise code by code, weighted by usage: G_k = Σ_m n_mk G_mk / Σ_m n_mk; a code no market used keeps
      its previous value.
    - Codes dead everywhere are re-seeded by splitting the most used codes (a small perturbation of them).

    Raises `PayloadError` on mismatched shapes or non-finite values, naming the market.
    """
    if not uploads:
        raise PayloadError("no codebook uploads to merge")
    first_market = next(iter(uploads))
    shape = np.shape(uploads[first_market][0])
    for market, (book, usage) in uploads.items():
        book, usage = np.asarray(book), np.asarray(usage)
        if book.ndim != 2 or book.shape != shape:
            raise PayloadError(
                f"market {market!r} uploaded a codebook of shape {book.shape}, market {first_market!r} {shape}: "
                "every market must use the same global_codes and latent_dim"
            )
        if usage.shape != (shape[0],):
            raise PayloadError(f"market {market!r}: usage has shape {usage.shape}, expected ({shape[0]},)")
        if not (np.isfinite(book).all() and np.isfinite(usage).all()) or (usage < 0).any():
            raise PayloadError(f"market {market!r}: codebook or usage holds NaN/Inf or negative counts")
    books = np.stack([np.asarray(b, dtype=np.float64) for b, _ in uploads.values()])  # [M, K, d]
    usages = np.stack([np.asarray(u, dtype=np.float64) for _, u in uploads.values()])  # [M, K]
    k = shape[0]
    if previous is None:
        if init == "first":
            merged = books[int(np.argmax(usages.sum(1)))].copy()
        else:
            points = torch.from_numpy(books.reshape(-1, shape[1])).float()
            weights = torch.from_numpy(usages.reshape(-1)).float()
            merged = kmeans(points, k, weights=weights, seed=seed)[0].double().numpy()
        # usage of the merged codes: each uploaded code's count goes to its nearest merged code
        nearest = torch.cdist(torch.from_numpy(books.reshape(-1, shape[1])), torch.from_numpy(merged)).argmin(
            1
        )
        total = np.bincount(nearest.numpy(), weights=usages.reshape(-1), minlength=k)
    else:
        total = usages.sum(0)
        merged = np.asarray(previous, dtype=np.float64).copy()
        used = total > 0
        merged[used] = (usages[:, used, None] * books[:, used]).sum(0) / total[used, None]
    _reseed_dead_codes(merged, total, seed)
    return merged.astype(np.float32), total.astype(np.float32)


def _reseed_dead_codes(merged: np.ndarray, total: np.ndarray, seed: int) -> None:
    """Codes no market used (total usage 0) become a small perturbation of the most used ones (in place)."""
    dead = np.flatnonzero(total <= 0)
    if len(dead) and (total > 0).any():
        rng = np.random.default_rng(seed)
        donors = np.argsort(-total)[: len(dead)]
        donors = np.resize(donors, len(dead))
        scale = 0.01 * merged.std()
        merged[dead] = merged[donors] + scale * rng.standard_normal((len(dead), merged.shape[1]))


def merge_codebook_sums(
    weighted_sum: np.ndarray, usage_sum: np.ndarray, previous: np.ndarray | None, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Step 3 from sums only (secure aggregation): ``weighted_sum`` = Σ_m u_mk G_mk ``[K, d]``, ``usage_sum`` =
    Σ_m u_mk ``[K]``. The same code-by-code merge as `merge_codebooks` after the first round,
    G_k = Σ_m u_mk G_mk / Σ_m u_mk, a code no market used keeps ``previous``, dead codes are re-seeded.
    Usage counts are integers, so ``usage_sum`` is rounded (removing the secure sum's quantisation error
    from the denominators). ``previous`` None (no merge yet, only if every market failed the first RQ-VAE
    round) leaves unused codes to the re-seeding."""
    weighted = np.asarray(weighted_sum, dtype=np.float64)
    total = np.round(np.asarray(usage_sum, dtype=np.float64))
    if weighted.ndim != 2 or total.shape != (weighted.shape[0],):
        raise PayloadError(f"codebook sums of shape {weighted.shape} and usage sums of shape {total.shape}")
    if not (np.isfinite(weighted).all() and np.isfinite(total).all()) or (total < 0).any():
        raise PayloadError("codebook or usage sums hold NaN/Inf or negative counts")
    merged = np.zeros_like(weighted) if previous is None else np.asarray(previous, dtype=np.float64).copy()
    used = total > 0
    merged[used] = weighted[used] / total[used, None]
    _reseed_dead_codes(merged, total, seed)
    return merged.astype(np.float32), total.astype(np.float32)


class FedMMStrategy(Strategy):
    """Phase-switching server: FedAvg for the embedding CTR model, usage-weighted codebook merging during
    the RQ-VAE rounds, FedAvg for the declared CTR parameters."""

    def __init__(
        self, opts: FedMMOptions, schedule: Schedule, seed: int = 0, secure_sums: bool = False
    ) -> None:
        self.opts = opts
        self.schedule = schedule
        self.seed = seed
        self.secure_sums = secure_sums  # markets upload weighted sums in RQ-VAE rounds after the first
        self.state: dict[str, Payload] = {"embed": {}, "rqvae": {}, "ctr": {}}
        # the server step of the FedAvg phases (the CTR model's declared dense parameters; fedctr's embedding
        # model) and its state per phase; the codebook merges are not a mean of parameters and are not affected
        self.server = opts.server_step()
        self.velocity: dict[str, Payload] = {"embed": {}, "ctr": {}}
        self.merged_once = {"global": False, "local": False}

    def initialize(self, initial: Payload) -> None:
        for phase in self.state:
            self.state[phase] = {
                k: np.array(v, copy=True) for k, v in initial.items() if k.startswith(f"{phase}.")
            }

    def configure_train(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        phase, step = self.schedule.phase(server_round)
        payload = self.state[phase]
        if phase == "ctr" and step == 0:
            # the first CTR round also brings the final merged codebook, so codes use the global G
            payload = {**self.state["rqvae"], **payload}
        if self.schedule.uploads_sums(self.opts, self.secure_sums, server_round):
            # zeros under the keys the markets send back (the runtimes accept only broadcast keys and shapes)
            payload = {**payload, **self._weighted_shapes(payload)}
        return {m: payload for m in markets}

    @staticmethod
    def _weighted_shapes(payload: Payload) -> Payload:
        out: Payload = {}
        for key, value in payload.items():
            if key in WEIGHTED_BOOKS:
                out[WEIGHTED_BOOKS[key]] = np.zeros_like(value)
            elif key.startswith(("rqvae.encoder.", "rqvae.decoder.")):
                out[WEIGHTED_AUTOENCODER + key[len("rqvae.") :]] = np.zeros_like(value)
        return out

    def step_kind(self, server_round: int) -> tuple[bool, str]:
        phase, _ = self.schedule.phase(server_round)
        if phase == "rqvae":  # first merge: k-means (clear); later ones: sums with secure aggregation
            return self.rqvae_step_kind(server_round)
        return True, f"FedMM {phase} round: example-weighted mean"

    def rqvae_step_kind(self, server_round: int) -> tuple[bool, str]:
        """(is this RQ-VAE round's server step a sum?, why), for `Strategy.step_kind`."""
        if self.opts.codebook == "local":
            return (
                True,
                "FedMM RQ-VAE round, no federated codebook: item-weighted mean of the encoder/decoder",
            )
        if self.schedule.uploads_sums(self.opts, self.secure_sums, server_round):
            return True, (
                "FedMM RQ-VAE round after the first merge: per-code usage-weighted mean Σu·G/Σu (and the "
                "item-weighted encoder/decoder) from the sums of what the markets upload with weight 1"
            )
        if self.schedule.phase(server_round)[1] == 0:
            return False, (
                "FedMM first RQ-VAE merge: usage-weighted k-means over the markets' local k-means centroids "
                "(codes of different markets do not correspond yet; server_init=first: the largest market's "
                "codebook), not a sum"
            )
        return False, (
            "FedMM RQ-VAE round: per-code usage ratios from each market's (codebook, usage); markets upload "
            "usage·codebook sums instead only with secure_aggregation on and privacy off"
        )

    def configure_evaluate(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        phase, _ = self.schedule.phase(server_round)
        return {m: self.state[phase] for m in markets}

    def aggregate_train(self, server_round: int, updates: dict[str, Update]) -> None:
        phase, _ = self.schedule.phase(server_round)
        updates = {m: u for m, u in updates.items() if u.payload}
        if not updates:
            return
        payloads = [u.payload for u in updates.values()]
        weights = [u.num_examples for u in updates.values()]
        if phase != "rqvae":
            self.state[phase], self.velocity[phase] = self.server.apply(
                self.state[phase], weighted_mean(payloads, weights), self.velocity[phase]
            )
            return
        if any(k in payloads[0] for k in WEIGHTED_BOOKS.values()):
            self._merge_sums(server_round, updates)
            return
        merged: Payload = {}
        autoencoder = [
            {k: v for k, v in p.items() if k.startswith(("rqvae.encoder.", "rqvae.decoder."))}
            for p in payloads
        ]
        if autoencoder[0]:
            merged.update(weighted_mean(autoencoder, weights))
        for level, book_key, usage_key in (
            ("global", GLOBAL_CODEBOOK, GLOBAL_USAGE),
            ("local", LOCAL_CODEBOOK, LOCAL_USAGE),
        ):
            if book_key not in payloads[0]:
                continue
            missing = [m for m, u in updates.items() if book_key not in u.payload]
            if missing:
                raise PayloadError(f"markets {missing} did not upload {book_key}")
            previous = self.state["rqvae"].get(book_key) if self.merged_once[level] else None
            merged[book_key], merged[usage_key] = merge_codebooks(
                {m: (u.payload[book_key], u.payload[usage_key]) for m, u in updates.items()},
                previous,
                init=self.opts.server_init,
                seed=int(market_seed(self.seed, "__server__", server_round).generate_state(1)[0]),
            )
            self.merged_once[level] = True
        self.state["rqvae"] = merged

    def _merge_sums(self, server_round: int, updates: dict[str, Update]) -> None:
        """RQ-VAE merge from weighted sums (`FedMMClient._weighted_upload`). ``updates`` are either every
        market's own sums (weight 1 each) or, behind secure aggregation, their mean with weight = the number
        of markets: Σ_updates weight · value is Σ over markets either way."""
        keys = sorted(next(iter(updates.values())).payload)
        for market, u in updates.items():
            if sorted(u.payload) != keys:
                raise PayloadError(
                    f"market {market!r} uploaded {sorted(u.payload)}, others {keys}: every market must send the "
                    "weighted sums in a secure RQ-VAE round"
                )
        total = {
            k: sum(
                float(u.num_examples) * np.asarray(u.payload[k], dtype=np.float64) for u in updates.values()
            )
            for k in keys
        }
        dtype = {k: np.asarray(next(iter(updates.values())).payload[k]).dtype for k in keys}
        items = float(np.round(total[GLOBAL_USAGE]).sum())  # Σ_m n_m, the plain merge's total weight
        if items <= 0:
            raise PayloadError("secure RQ-VAE round: the usage sums are zero")
        merged: Payload = {}
        for k in keys:
            if k.startswith(WEIGHTED_AUTOENCODER):
                merged["rqvae." + k[len(WEIGHTED_AUTOENCODER) :]] = (total[k] / items).astype(dtype[k])
        for level, book_key, usage_key in (
            ("global", GLOBAL_CODEBOOK, GLOBAL_USAGE),
            ("local", LOCAL_CODEBOOK, LOCAL_USAGE),
        ):
            if WEIGHTED_BOOKS[book_key] not in total:
                continue
            if not self.merged_once[level]:
                log.warning(
                    "FedMM round %d: first %s codebook merge from sums (code-by-code)", server_round, level
                )
            previous = self.state["rqvae"].get(book_key) if self.merged_once[level] else None
            merged[book_key], merged[usage_key] = merge_codebook_sums(
                total[WEIGHTED_BOOKS[book_key]],
                total[usage_key],
                previous,
                seed=int(market_seed(self.seed, "__server__", server_round).generate_state(1)[0]),
            )
            self.merged_once[level] = True
        self.state["rqvae"] = merged

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "merged_once": dict(self.merged_once), "server_velocity": self.velocity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {k: dict(v) for k, v in state["state"].items()}
        self.merged_once = dict(state["merged_once"])
        velocity = state.get("server_velocity", {})  # absent in checkpoints written before server momentum
        self.velocity = {phase: dict(velocity.get(phase, {})) for phase in ("embed", "ctr")}


# ----------------------------------------------------------------------------- build + register
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
        declare=lambda cfg, opts: upload_declaration(opts, uses_secure_sums(cfg)),
    )
)


# ----------------------------------------------------------------------------- analysis only
def code_alignment(codes: dict[str, np.ndarray], raw_keys: dict[str, np.ndarray]) -> dict[str, Any]:
    """ANALYSIS ONLY (METHODS.md step 6; reads raw item keys, so no federated step may call it).

    For every pair of markets, over the items sharing a raw key (ASIN): the share that received the same
    level-1 code, against the share expected by chance if codes were independent, Σ_k p_a(k) p_b(k), with
    p_a, p_b the code-usage distributions of the shared items on each side. Pooled over pairs by counts."""
    pairs: dict[str, dict[str, float]] = {}
    same_total = chance_total = n_total = 0.0
    names = list(codes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common, ia, ib = np.intersect1d(
                raw_keys[a].astype(str), raw_keys[b].astype(str), return_indices=True
            )
            if len(common) == 0:
                continue
            ca, cb = codes[a][ia], codes[b][ib]
            k = int(max(ca.max(), cb.max())) + 1
            pa, pb = np.bincount(ca, minlength=k) / len(ca), np.bincount(cb, minlength=k) / len(cb)
            same, chance = float((ca == cb).mean()), float((pa * pb).sum())
            pairs[f"{a}-{b}"] = {"shared_items": len(common), "same_code": same, "chance": chance}
            same_total += same * len(common)
            chance_total += chance * len(common)
            n_total += len(common)
    same = same_total / max(n_total, 1)
    chance = chance_total / max(n_total, 1)
    return {
        "same_code": same,
        "chance": chance,
        "lift": same / chance if chance > 0 else float("nan"),
        "shared_pairs": int(n_total),
        "pairs": pairs,
    }


def alignment_from_run(run_dir: str | Path, write: bool = True) -> dict[str, Any]:
    """ANALYSIS ONLY: level-1 code alignment of every seed of a FedMM run folder, from the codes stored in
    its round checkpoints, written to ``alignment.json`` in the run folder."""

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    data = prepare_data(cfg)
    raw = {n: s.market.item_ids for n, s in data.splits.items()}
    out: dict[str, Any] = {
        "note": "analysis only: uses raw item keys (ASIN), never part of training",
        "seeds": {},
    }
    for ckpt in sorted((run_dir / "checkpoints").glob("seed*.ckpt")):
        state = load_state(ckpt)
        codes = {m: s["codes"][0] for m, s in state["trainers"].items() if s.get("codes") is not None}
        if codes:
            out["seeds"][ckpt.stem] = code_alignment(codes, {m: raw[m] for m in codes})
    seeds = list(out["seeds"].values())
    if seeds:
        out["same_code"] = float(np.mean([s["same_code"] for s in seeds]))
        out["chance"] = float(np.mean([s["chance"] for s in seeds]))
        out["lift"] = out["same_code"] / out["chance"] if out["chance"] > 0 else float("nan")
    if write:
        (run_dir / "alignment.json").write_text(json.dumps(out, indent=2))
    return out
