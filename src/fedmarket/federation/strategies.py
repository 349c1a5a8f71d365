"""Server strategies of the FedAvg family."""

from __future__ import annotations

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


def server_step(
    current: Payload,
    aggregate: Payload,
    server_lr: float,
    momentum: float = 0.0,
    velocity: Payload | None = None,
) -> tuple[Payload, Payload]:
    """The server's step towards the aggregate, with optional momentum (FedOpt's server SGD; FedAvgM, Hsu et al.
    2019): v ← β v + (agg − θ), θ ← θ + η_g v for every floating-point key present in both ``current`` and
    ``aggregate`` (other keys are taken from ``aggregate``). Returns (new θ, new v). η_g = 1 and β = 0, or no
    current state: θ = agg (plain FedAvg). ``velocity`` may lack keys (v = 0 there); it stays empty when β = 0."""
    if not current or (server_lr == 1.0 and not momentum):
        return aggregate, {}
    velocity = velocity or {}
    out: Payload = {}
    new_velocity: Payload = {}
    for key, new in aggregate.items():
        old = current.get(key)
        if old is None or not np.issubdtype(np.asarray(new).dtype, np.floating):
            out[key] = new
            continue
        old64 = np.asarray(old, np.float64)
        v = np.asarray(new, np.float64) - old64
        if momentum and key in velocity:
            v = momentum * np.asarray(velocity[key], np.float64) + v
        out[key] = (old64 + server_lr * v).astype(np.asarray(new).dtype)
        if momentum:
            new_velocity[key] = v.astype(np.float32)
    return out, new_velocity


class FedAvg(Strategy):
    """FedAvg (McMahan et al., AISTATS 2017): every market downloads the global shared parameters and the
    server replaces them with the example-weighted mean of the uploads, θ ← Σ_k (n_k/n) θ_k.

    ``aggregation`` = "mean" (default), "median" or "trimmed_mean" (robust options).
    ``server_lr`` = η_g: the server moves the global state η_g times the way to the aggregate,
    θ ← θ + η_g (agg − θ) (FedOpt's server SGD, Reddi et al., ICLR 2021); 1 is plain FedAvg. With markets of
    different sizes the mean update takes fewer effective steps than the largest market alone; η_g > 1
    compensates. ``server_momentum`` = β: server momentum (FedAvgM), v ← β v + (agg − θ), θ ← θ + η_g v;
    0 (default) is the plain server step. The velocity is server state (checkpointed), never sent to markets.
    """

    def __init__(
        self,
        aggregation: str = "mean",
        trim_ratio: float = 0.1,
        options: dict[str, Any] | None = None,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
    ):
        if aggregation not in ("mean", "median", "trimmed_mean"):
            raise ValueError(f"aggregation must be 'mean', 'median' or 'trimmed_mean', got {aggregation!r}")
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        if not 0 <= server_momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {server_momentum}")
        self.server_lr = float(server_lr)
        self.server_momentum = float(server_momentum)
        self.velocity: Payload = {}
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
        self.global_payload, self.velocity = server_step(
            self.global_payload, aggregate, self.server_lr, self.server_momentum, self.velocity
        )

    def round_options(self, server_round: int) -> dict[str, Any]:
        return dict(self.options)

    def state_dict(self) -> dict[str, Any]:
        return {"global_payload": self.global_payload, "server_velocity": self.velocity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_payload = dict(state["global_payload"])
        self.velocity = dict(state.get("server_velocity", {}))
