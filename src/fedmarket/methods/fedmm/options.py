"""FedMM's options, what may leave a market (`FEDMM_UPLOAD`, narrowed per configuration by
`upload_declaration`) and the round schedule (`Schedule`: which phase a server round belongs to)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fedmarket.errors import ConfigError
from fedmarket.federation.payload import UploadDeclaration
from fedmarket.methods.base import ServerStepOptions

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


def upload_declaration(
    opts: FedMMOptions, secure_sums: bool = False, model: str | None = None
) -> UploadDeclaration:
    """The subset of `FEDMM_UPLOAD` that this configuration sends (the runtime checks against the full one);
    ``secure_sums``: secure aggregation is on (see `FedMMClient.secure_sums`); ``model``: the CTR model's name
    (the cross network's parameters exist in ``dcnv2`` only; None: either model)."""
    dense = CTR_DENSE if model in (None, "dcnv2") else tuple(p for p in CTR_DENSE if p != "cross.*")
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
        keys += [f"embed.{p}" for p in dense]
    if opts.ctr_federation != "none":
        keys += [f"ctr.{p}" for p in dense]
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
