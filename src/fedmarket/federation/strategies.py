"""Server strategies of the FedAvg family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmarket.federation.aggregators import coordinate_median, trimmed_mean, weighted_mean
from fedmarket.federation.core import Strategy, Update
from fedmarket.federation.payload import Payload


class NoFederation(Strategy):
    """Local training: the server sends nothing and receives nothing."""

    def initialize(self, initial: Payload) -> None:
        pass

    def configure_train(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        return {m: {} for m in markets}

    def aggregate_train(self, server_round: int, updates: dict[str, Update]) -> None:
        pass

    def step_kind(self, server_round: int) -> tuple[bool, str]:
        return False, "nothing is aggregated (no federation)"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FederatedPhase:
    """Mixin for strategies that federate in rounds 1..``federated_rounds`` and then fine-tune locally (FedAvg +
    fine-tune, FeCoSR): the phase boundary is checkpointed, and with ``train.patience`` the federated phase
    ends at its validation plateau (`fedmarket.federation.runtime.Plateau` calls ``on_plateau``)."""

    federated_rounds: int

    def in_first_phase(self, server_round: int) -> bool:
        """Round ``server_round`` belongs to the federated (or source) phase that a plateau may end."""
        return 0 < server_round <= self.federated_rounds

    def first_phase_limit(self) -> int | None:
        """The federated phase's last round (its maximum while a plateau has not ended it earlier)."""
        return self.federated_rounds

    def on_plateau(self, server_round: int) -> bool:
        """True: the federated phase ended here, fine-tuning starts next round (``federated_rounds`` is then
        the maximum). False: no fine-tuning stage (``federated_rounds`` = 0), or it converged too: stop."""
        if self.in_first_phase(server_round):
            self.federated_rounds = server_round
            return True
        return False

    def phase_state(self) -> dict[str, Any]:
        """The phase boundary, for the checkpoint (strategies with their own ``state_dict`` add it)."""
        return {"federated_rounds": self.federated_rounds}

    def load_phase_state(self, state: dict[str, Any]) -> None:
        self.federated_rounds = int(state.get("federated_rounds", self.federated_rounds))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.phase_state()}  # type: ignore[misc]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)  # type: ignore[misc]
        self.load_phase_state(state)


SERVER_OPTIMIZERS = ("sgd", "adam", "yogi")
SECOND_MOMENT = "second_moment/"  # state key prefix of adam's and yogi's second moment


@dataclass(frozen=True)
class ServerStep:
    """The server's step from the global state θ towards the aggregate (FedOpt, Reddi et al., ICLR 2021), with
    Δ = agg − θ for every floating-point key present in both (other keys are taken from the aggregate):

    - ``sgd``: v ← β v + Δ, θ ← θ + η v. η = 1 and β = 0 is plain FedAvg (θ = agg); β > 0 is server momentum
      (FedAvgM, Hsu et al. 2019); η > 1 compensates the fewer effective steps of a mean over markets of unequal
      size.
    - ``adam`` (FedAdam): m ← β m + (1 − β) Δ, s ← β₂ s + (1 − β₂) Δ², θ ← θ + η m / (√s + τ).
    - ``yogi`` (FedYogi): the same with s ← s − (1 − β₂) Δ² sign(s − Δ²).

    m starts at 0 and s at τ² (Reddi et al., Algorithm 2); with adam and yogi η is a per-coordinate step size
    (the paper's best are ≈ 10⁻³–10⁻¹), not a multiple of Δ. The state (v; or m and s, the latter under keys
    prefixed ``second_moment/``) is server state: checkpointed, never sent to a market. ``ValueError`` names the
    option (``server_lr``, ``server_momentum``, ``server_optimizer``, ``server_beta2``, ``server_tau``) that is
    out of range."""

    name: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server_optimizer must be one of {list(SERVER_OPTIMIZERS)}, got {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"server_lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.beta2 < 1:
            raise ValueError(f"server_beta2 must be in [0, 1), got {self.beta2}")
        if not self.tau > 0:
            raise ValueError(f"server_tau must be > 0, got {self.tau}")

    @property
    def is_plain(self) -> bool:
        """The step returns the aggregate itself (plain FedAvg)."""
        return self.name == "sgd" and self.lr == 1.0 and not self.momentum

    def apply(
        self, current: Payload, aggregate: Payload, state: Payload | None = None
    ) -> tuple[Payload, Payload]:
        """(new θ, new state). No current state (the first aggregate) or a plain step: θ = agg. ``state`` may
        lack keys (zero moments there; s = τ²); it stays empty for sgd without momentum."""
        if not current or self.is_plain:
            return aggregate, {}
        state = state or {}
        out: Payload = {}
        new_state: Payload = {}
        for key, new in aggregate.items():
            old = current.get(key)
            if old is None or not np.issubdtype(np.asarray(new).dtype, np.floating):
                out[key] = new
                continue
            old64 = np.asarray(old, np.float64)
            delta = np.asarray(new, np.float64) - old64
            if self.name == "sgd":
                v = delta
                if self.momentum and key in state:
                    v = self.momentum * np.asarray(state[key], np.float64) + v
                out[key] = (old64 + self.lr * v).astype(np.asarray(new).dtype)
                if self.momentum:
                    new_state[key] = v.astype(np.float32)
                continue
            m = (1 - self.momentum) * delta
            if key in state:
                m += self.momentum * np.asarray(state[key], np.float64)
            s_key = SECOND_MOMENT + key
            s = np.asarray(state[s_key], np.float64) if s_key in state else np.full_like(delta, self.tau**2)
            sq = delta * delta
            if self.name == "adam":
                s = self.beta2 * s + (1 - self.beta2) * sq
            else:
                s = s - (1 - self.beta2) * sq * np.sign(s - sq)
            out[key] = (old64 + self.lr * m / (np.sqrt(s) + self.tau)).astype(np.asarray(new).dtype)
            new_state[key] = m.astype(np.float32)
            new_state[s_key] = s.astype(np.float32)
        return out, new_state


class FedAvg(Strategy):
    """FedAvg (McMahan et al., AISTATS 2017): every market downloads the global shared parameters and the
    server replaces them with the example-weighted mean of the uploads, θ ← Σ_k (n_k/n) θ_k.

    ``aggregation`` = "mean" (default), "median" or "trimmed_mean" (robust options).
    ``server_lr`` (η_g), ``server_momentum`` (β), ``server_optimizer`` ("sgd", "adam", "yogi"), ``server_beta2``,
    ``server_tau``: the server's step towards the aggregate (`ServerStep`; FedOpt, Reddi et al., ICLR 2021).
    The defaults (sgd, η_g = 1, β = 0) are plain FedAvg.
    """

    def __init__(
        self,
        aggregation: str = "mean",
        trim_ratio: float = 0.1,
        options: dict[str, Any] | None = None,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_optimizer: str = "sgd",
        server_beta2: float = 0.99,
        server_tau: float = 1e-3,
    ):
        if aggregation not in ("mean", "median", "trimmed_mean"):
            raise ValueError(f"aggregation must be 'mean', 'median' or 'trimmed_mean', got {aggregation!r}")
        self.server = ServerStep(server_optimizer, server_lr, server_momentum, server_beta2, server_tau)
        self.velocity: Payload = {}  # the server step's state (`ServerStep.apply`)
        self.aggregation = aggregation
        self.trim_ratio = trim_ratio
        self.options = dict(options or {})
        self.global_payload: Payload = {}

    def initialize(self, initial: Payload) -> None:
        self.global_payload = {k: np.array(v, copy=True) for k, v in initial.items()}

    def configure_train(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        return {m: self.global_payload for m in markets}

    def aggregate_train(self, server_round: int, updates: dict[str, Update]) -> None:
        if not updates:
            return
        payloads = [u.payload for u in updates.values()]
        if self.aggregation == "median":
            aggregate = coordinate_median(payloads)
        elif self.aggregation == "trimmed_mean":
            aggregate = trimmed_mean(payloads, self.trim_ratio)
        else:
            aggregate = weighted_mean(payloads, [u.num_examples for u in updates.values()])
        self.global_payload, self.velocity = self.server.apply(self.global_payload, aggregate, self.velocity)

    @property
    def server_lr(self) -> float:
        return self.server.lr

    @property
    def server_momentum(self) -> float:
        return self.server.momentum

    def round_options(self, server_round: int) -> dict[str, Any]:
        return dict(self.options)

    def step_kind(self, server_round: int) -> tuple[bool, str]:
        if self.aggregation == "mean":
            return True, "example-weighted mean (FedAvg)"
        return False, f"coordinate-wise {self.aggregation} needs every upload, not their sum"

    def state_dict(self) -> dict[str, Any]:
        return {"global_payload": self.global_payload, "server_velocity": self.velocity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_payload = dict(state["global_payload"])
        self.velocity = dict(state.get("server_velocity", {}))


class FedAvgThenLocal(FederatedPhase, FedAvg):
    """FedAvg for rounds 1..F, then local fine-tuning (FedAvg + fine-tune, FeCoSR): round F+1 downloads the
    final global model once, later rounds download nothing, and from F+1 on markets are told to fine-tune
    and upload nothing (round options ``upload``, ``finetune``; ``F = 0``: FedAvg in every round, no
    fine-tuning). With ``train.patience`` the federated phase ends at its validation plateau (`FederatedPhase`)."""

    def __init__(self, federated_rounds: int = 0, aggregation: str = "mean", **kwargs: Any) -> None:
        super().__init__(aggregation, **kwargs)
        self.federated_rounds = federated_rounds
        self.newcomers: list[str] = []  # joined late, not yet trained with the global model

    def admit(self, market: str, server_round: int) -> None:
        """A newcomer gets the global model with its first training round, also in the fine-tuning phase
        (where others download nothing), and fine-tunes it with fresh local embeddings."""
        if market not in self.newcomers:
            self.newcomers.append(market)

    def federated(self, server_round: int) -> bool:
        return self.federated_rounds == 0 or server_round <= self.federated_rounds

    def configure_train(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        if self.federated(server_round) or server_round == self.federated_rounds + 1:
            return super().configure_train(server_round, markets)
        return {m: (self.global_payload if m in self.newcomers else {}) for m in markets}

    def configure_evaluate(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        if self.federated(server_round):
            return super().configure_train(server_round, markets)
        return {m: {} for m in markets}  # each market evaluates its own fine-tuned model

    def aggregate_train(self, server_round: int, updates: dict[str, Update]) -> None:
        self.newcomers = [m for m in self.newcomers if m not in updates]
        if self.federated(server_round):
            super().aggregate_train(server_round, updates)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "newcomers": list(self.newcomers)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.newcomers = list(state.get("newcomers", []))

    def round_options(self, server_round: int) -> dict[str, Any]:
        federated = self.federated(server_round)
        return {**super().round_options(server_round), "upload": federated, "finetune": not federated}
