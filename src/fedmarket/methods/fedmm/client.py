"""One market's FedMM trainer (`FedMMClient`): collaborative embeddings → dual-codebook RQ-VAE → CTR with
codes. Uploads are built from the declaration in force (`upload_declaration`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from fedmarket.data.split import MarketSplit, market_seed
from fedmarket.errors import PayloadError
from fedmarket.federation.core import ClientTrainer, MarketMetrics, RoundConfig, Update
from fedmarket.federation.payload import Payload, UploadDeclaration
from fedmarket.methods.ctr_trainer import CTRClient, CTRData
from fedmarket.methods.epochs import run_epochs
from fedmarket.methods.fedmm.features import rqvae_input, user_history_codes
from fedmarket.methods.fedmm.options import (
    CTR_DENSE,
    GLOBAL_CODEBOOK,
    GLOBAL_USAGE,
    LOCAL_CODEBOOK,
    LOCAL_USAGE,
    WEIGHTED_AUTOENCODER,
    WEIGHTED_BOOKS,
    FedMMOptions,
    Schedule,
    upload_declaration,
)
from fedmarket.methods.item_stats import ITEM_STAT_NAMES, item_statistics
from fedmarket.models.collab import train_collaborative_embeddings
from fedmarket.models.rqvae import DualCodebookRQVAE, code_statistics, code_usage


def _with_prefix(payload: Payload, prefix: str) -> Payload:
    return {f"{prefix}{k}": v for k, v in payload.items()}


def _strip_prefix(payload: Payload | None, prefix: str) -> Payload:
    return {k[len(prefix) :]: v for k, v in (payload or {}).items() if k.startswith(prefix)}


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
    def workload(self) -> int:
        """Train examples per round (`ClientTrainer.workload`)."""
        return self.ctr.workload()

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
            self._embed_if_late(payload, config)
            self.item_input = self._build_item_input()
            self.rqvae.init_codebooks(self.item_input, seed, init_global=not have_global)
        x = self.item_input
        gen = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(self.rqvae.parameters(), lr=self.opts.rqvae_lr)
        bs = self.opts.rqvae_batch_size

        def batches(_epoch: int) -> Iterator[torch.Tensor]:
            # one permutation per epoch, all drawn from the round's generator
            perm = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x), bs):
                yield x[perm[s : s + bs]]

        def loss_fn(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
            out = self.rqvae(batch)
            return out["loss"], out["recon"], len(batch)

        epochs = self.opts.rqvae_epochs * config.local_epochs
        record = run_epochs(self.rqvae, optimizer, batches, loss_fn, epochs=epochs)
        recon = [value for epoch in record for value in epoch.values]  # per batch, unweighted
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

    def _embed_if_late(self, payload: Payload, config: RoundConfig) -> None:
        """A market that joined after the embedding phase trains its item embeddings now (locally; with a
        federated embedding model, from the federation's, which the server sends a newcomer)."""
        if self.item_embeddings is None and self.opts.item_stats != "only":
            self.fit_embeddings({k: v for k, v in payload.items() if k.startswith("embed.")}, config)

    def _catch_up(self, payload: Payload, config: RoundConfig) -> None:
        """A market that joined after the RQ-VAE phase (the server sends a newcomer the merged codebook and
        autoencoder with its first CTR round): its item embeddings, then the federation's global codebook as
        is and its own local codebook by k-means on its residuals (the RQ-VAE's initialisation)."""
        self._embed_if_late(payload, config)
        self.item_input = self._build_item_input()
        have_global, _ = self._load_rqvae(payload)
        seed = int(market_seed(config.seed, self.market, config.round).generate_state(1)[0])
        with torch.no_grad():
            self.rqvae.init_codebooks(self.item_input, seed, init_global=not have_global)

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
                self._catch_up(payload, config)
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
