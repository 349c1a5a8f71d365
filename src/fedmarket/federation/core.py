"""The framework-free federation contract (DESIGN.md, "federation/").

- A `ClientTrainer` lives inside one market. It turns (server payload, round config) into an `Update`
  (payload, example count, metrics) and evaluates its current model on its own validation/test data.
- A `Strategy` lives on the server. It decides what each market downloads in a round
  (``configure_train``; a personalised strategy may send each market something different) and turns a
  round's updates into its next state (``aggregate_train``).

Both are plain objects with ``state_dict`` / ``load_state_dict`` so the runtime can checkpoint a round and
resume it, and so the same objects run unchanged in-process or inside Flower apps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, TypedDict

from fedmarket.federation.payload import Payload, upload_contract

# market -> metric -> value. A trainer usually reports its own market only; a pooled (centralised)
# trainer reports every market it holds.
MarketMetrics = dict[str, dict[str, float]]


@dataclass
class RoundConfig:
    """What the server tells a market about this round."""

    round: int  # 1-based
    local_epochs: int
    seed: int
    options: RoundOptions = field(default_factory=dict)  # type: ignore[assignment]


@dataclass
class Update:
    """A market's answer to one training round."""

    payload: Payload
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class ClientTrainer(ABC):
    """One market's trainer. Its data and every parameter not in an upload stay inside it."""

    market: str

    @property
    def markets(self) -> list[str]:
        """Markets whose metrics `evaluate` reports (a pooled trainer holds several)."""
        return [self.market]

    @abstractmethod
    def initial_payload(self) -> Payload:
        """The shared parameters as initialised locally (the server may start from one market's)."""

    @abstractmethod
    def fit(self, payload: Payload, config: RoundConfig) -> Update:
        """Load ``payload``, train locally, return the upload."""

    @abstractmethod
    def evaluate(self, payload: Payload | None, split: str, full_ranking: bool = False) -> MarketMetrics:
        """Load ``payload`` (if any) and evaluate on ``split`` ("valid" or "test")."""

    def workload(self) -> int:
        """A market's relative training cost per round (its train examples), by which markets are spread
        over worker processes (`ParallelTransport`). Default: 1 (all alike)."""
        return 1

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this market's training exactly (model, optimiser...)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def export_model(self, market: str) -> Any:
        """``market``'s current model for serving (`fedmarket.serving.models`), or None when the state holds no
        scoring model. A trainer that cannot be served keeps this default."""
        raise NotImplementedError(f"{type(self).__name__} has no export hook")


class RoundOptions(TypedDict, total=False):
    """The per-round options a strategy sends with `RoundConfig` (``Strategy.round_options``); every key is
    optional and a trainer ignores the ones it does not use. JSON-serialisable, so it travels to a remote
    market unchanged."""

    upload: bool  # False: train but upload nothing (local phases)
    finetune: bool  # the local fine-tuning phase (market-specific modules train)
    proximal_mu: float  # FedProx / Ditto proximal weight towards the download
    ditto_lambda: float  # Ditto's personal-model regulariser
    active: list[str]  # one-to-one transfer: the markets that train in this round (others skip it)


class Strategy(ABC):
    """Server side of a method."""

    @abstractmethod
    def initialize(self, initial: Payload) -> None:
        """Set the starting global state from an initial payload."""

    @abstractmethod
    def configure_train(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        """What each selected market downloads before training this round."""

    @abstractmethod
    def aggregate_train(self, server_round: int, updates: dict[str, Update]) -> None:
        """Fold the round's successful updates into the server state."""

    def configure_evaluate(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        """What each market loads before evaluating after this round (default: next round's download)."""
        return self.configure_train(server_round + 1, markets)

    def round_options(self, server_round: int) -> RoundOptions:
        """Extra per-round options sent with `RoundConfig` (e.g. FedProx's μ; `RoundOptions`)."""
        return {}

    def step_kind(self, server_round: int) -> tuple[bool, str]:
        """(is the server step of ``server_round`` one weighted sum of the uploads?, why). Secure aggregation
        runs only on sum steps and says why it cannot run otherwise. Default: not a sum (a personalised or
        non-linear server step), so secure aggregation never silently changes a method's server step."""
        return False, (
            f"{type(self).__name__}: personalised or non-linear server step (each market gets its own "
            "combination of the others' uploads), not one weighted sum"
        )

    # ---- phases (FedAvg + fine-tune, FeCoSR, one-to-one transfer: `strategies.FederatedPhase`)
    def in_first_phase(self, server_round: int) -> bool:
        """Round ``server_round`` belongs to a first phase (federated or source pre-training) that a
        validation plateau may end. Default: no phases."""
        return False

    def first_phase_limit(self) -> int | None:
        """The first phase's last round (its maximum), or None without phases."""
        return None

    def on_plateau(self, server_round: int) -> bool:
        """The validation plateau was reached after ``server_round``: True if that ends a phase (the run goes
        on, counting afresh), False if the run has converged. Default: converged."""
        return False

    def plateau_markets(self, server_round: int) -> list[str] | None:
        """The markets whose validation score counts for the plateau in this round (None: all)."""
        return None

    def upload_contract(self, server_round: int, download: Payload) -> dict[str, tuple[int, ...]]:
        """The keys and shapes a market may upload after ``download`` this round (the driver and a market
        behind secure aggregation check uploads against it). Default: the download's own keys and shapes. A
        strategy whose markets upload under other keys (FedMM's weighted sums) adds them here instead of
        broadcasting placeholder arrays."""
        return upload_contract(download)

    # ---- membership
    def admit(self, market: str, server_round: int) -> None:
        """``market`` joins the running federation at ``server_round`` (> 1). What a newcomer gets first is
        the strategy's choice: by default whatever `configure_train` sends any market that round (the FedAvg
        family: the current global model; the market's own parts start fresh). Strategies whose later rounds
        send nothing (fine-tuning phases) override this to send the newcomer the shared state once."""
        return None

    # ---- what the server reports and when it stops
    def round_metrics(self, server_round: int) -> dict[str, float]:
        """Server-side columns added to this round's validation rows (e.g. ε). Default: none."""
        return {}

    def stop_before(self, server_round: int) -> bool:
        """True: do not run ``server_round`` (e.g. it would exceed a privacy budget). Default: never."""
        return False

    def privacy_report(self) -> dict[str, Any]:
        """The run's privacy record (DP accountant, secure-aggregation rounds). Default: nothing to report."""
        return {}

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class StrategyWrapper(Strategy):
    """A strategy that delegates every step of the contract to ``inner``; a subclass overrides the steps it
    changes (DP noise and accounting, simulated secure aggregation). Nothing is forwarded implicitly: a new
    hook on `Strategy` must be forwarded here."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def initialize(self, initial: Payload) -> None:
        self.inner.initialize(initial)

    def configure_train(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        return self.inner.configure_train(server_round, markets)

    def aggregate_train(self, server_round: int, updates: dict[str, Update]) -> None:
        self.inner.aggregate_train(server_round, updates)

    def configure_evaluate(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        return self.inner.configure_evaluate(server_round, markets)

    def round_options(self, server_round: int) -> RoundOptions:
        return self.inner.round_options(server_round)

    def step_kind(self, server_round: int) -> tuple[bool, str]:
        return self.inner.step_kind(server_round)

    def in_first_phase(self, server_round: int) -> bool:
        return self.inner.in_first_phase(server_round)

    def first_phase_limit(self) -> int | None:
        return self.inner.first_phase_limit()

    def on_plateau(self, server_round: int) -> bool:
        return self.inner.on_plateau(server_round)

    def plateau_markets(self, server_round: int) -> list[str] | None:
        return self.inner.plateau_markets(server_round)

    def admit(self, market: str, server_round: int) -> None:
        self.inner.admit(market, server_round)

    def upload_contract(self, server_round: int, download: Payload) -> dict[str, tuple[int, ...]]:
        return self.inner.upload_contract(server_round, download)

    def round_metrics(self, server_round: int) -> dict[str, float]:
        return self.inner.round_metrics(server_round)

    def stop_before(self, server_round: int) -> bool:
        return self.inner.stop_before(server_round)

    def privacy_report(self) -> dict[str, Any]:
        return self.inner.privacy_report()

    @property
    def base(self) -> Strategy:
        """The method's own strategy under every wrapper."""
        inner = self.inner
        return inner.base if isinstance(inner, StrategyWrapper) else inner

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class TrainerWrapper(ClientTrainer):
    """A trainer that delegates everything to ``inner``; a subclass overrides the step it changes
    (e.g. `fit` to clip and noise an update, or to simulate an attack)."""

    def __init__(self, inner: ClientTrainer) -> None:
        self.inner = inner
        self.market = inner.market

    @property
    def markets(self) -> list[str]:
        return self.inner.markets

    def initial_payload(self) -> Payload:
        return self.inner.initial_payload()

    def workload(self) -> int:
        return self.inner.workload()

    def fit(self, payload: Payload, config: RoundConfig) -> Update:
        return self.inner.fit(payload, config)

    def evaluate(self, payload: Payload | None, split: str, full_ranking: bool = False) -> MarketMetrics:
        return self.inner.evaluate(payload, split, full_ranking)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def export_model(self, market: str) -> Any:
        return self.inner.export_model(market)
