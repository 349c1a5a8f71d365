"""FedMM's server: the codebook merges (`merge_codebooks`, `merge_codebook_sums`) and the phase-switching
strategy (`FedMMStrategy`)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from fedmarket.data.split import market_seed
from fedmarket.errors import PayloadError
from fedmarket.federation.aggregators import weighted_mean
from fedmarket.federation.core import Strategy, Update
from fedmarket.federation.payload import Payload, upload_contract
from fedmarket.methods.fedmm.options import (
    GLOBAL_CODEBOOK,
    GLOBAL_USAGE,
    LOCAL_CODEBOOK,
    LOCAL_USAGE,
    WEIGHTED_AUTOENCODER,
    WEIGHTED_BOOKS,
    FedMMOptions,
    Schedule,
)
from fedmarket.models.rqvae import kmeans

log = logging.getLogger(__name__)


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
        self.newcomers: list[str] = []  # joined in the CTR phase, not yet sent the merged codebook

    def admit(self, market: str, server_round: int) -> None:
        """A newcomer in the CTR phase gets, with its first training round, the merged codebook and
        autoencoder (and a federated embedding model) besides the CTR model: it keeps the global codebook as
        the federation's and fits its own local codebook (`FedMMClient`). Earlier, the phase's own download
        is all it needs."""
        if self.schedule.phase(server_round)[0] == "ctr" and market not in self.newcomers:
            self.newcomers.append(market)

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
        catch_up = {**self.state["embed"], **self.state["rqvae"], **payload}
        return {m: (catch_up if m in self.newcomers else payload) for m in markets}

    def upload_contract(self, server_round: int, download: Payload) -> dict[str, tuple[int, ...]]:
        """In a round of weighted sums (secure aggregation), markets send usage·codebook and n·autoencoder
        under their own keys, each shaped as the downloaded array it weights."""
        contract = upload_contract(download)
        if self.schedule.uploads_sums(self.opts, self.secure_sums, server_round):
            for key, shape in list(contract.items()):
                if key in WEIGHTED_BOOKS:
                    contract[WEIGHTED_BOOKS[key]] = shape
                elif key.startswith(("rqvae.encoder.", "rqvae.decoder.")):
                    contract[WEIGHTED_AUTOENCODER + key[len("rqvae.") :]] = shape
        return contract

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
        self.newcomers = [m for m in self.newcomers if m not in updates]
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
        return {
            "state": self.state,
            "merged_once": dict(self.merged_once),
            "server_velocity": self.velocity,
            "newcomers": list(self.newcomers),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {k: dict(v) for k, v in state["state"].items()}
        self.merged_once = dict(state["merged_once"])
        velocity = state.get("server_velocity", {})  # absent in checkpoints written before server momentum
        self.velocity = {phase: dict(velocity.get(phase, {})) for phase in ("embed", "ctr")}
        self.newcomers = list(state.get("newcomers", []))
