"""The method registry. A method = client trainers + a server strategy + the declaration of what leaves a
market. Each method module registers itself with `register` and states its `UploadDeclaration` once, at
the top of the module, so a reader (and `tests/test_payload_declarations.py`) finds it in one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedmarket.config import ExperimentConfig, _build
from fedmarket.data.split import MarketSplit
from fedmarket.errors import ConfigError
from fedmarket.federation.core import ClientTrainer, Strategy
from fedmarket.federation.payload import UploadDeclaration
from fedmarket.federation.strategies import ServerStep

BuildFn = Callable[
    [ExperimentConfig, Any, dict[str, MarketSplit], int], tuple[dict[str, ClientTrainer], Strategy]
]


@dataclass(frozen=True)
class Method:
    name: str
    declaration: UploadDeclaration
    build: BuildFn
    options: type  # dataclass of method.options, validated on load
    private: bool = True
    task: str = "ctr"
    summary: str = ""
    # the declaration in force for a run's options (``declare(cfg, opts)``), a subset of ``declaration`` (the
    # union over every option); None: ``declaration`` itself
    declare: Callable[[ExperimentConfig, Any], UploadDeclaration] | None = None

    def declaration_for(self, cfg: ExperimentConfig, opts: Any = None) -> UploadDeclaration:
        """What may leave a market in a run with ``cfg`` (and its parsed ``method.options``): the runtime checks
        every upload against this, not against the union ``declaration``."""
        if self.declare is None:
            return self.declaration
        narrowed = self.declare(cfg, self.parse_options(cfg.method.options) if opts is None else opts)
        wider = [p for p in narrowed.patterns if not self.declaration.allows(p.replace("*", "x"))]
        wider += [m for m in narrowed.metrics if m not in self.declaration.metrics]
        if wider:
            raise ValueError(
                f"method {self.name!r}: the declaration in force has patterns {wider} outside {self.declaration.patterns}"
            )
        return narrowed

    def parse_options(self, raw: dict[str, Any]) -> Any:
        opts = _build(self.options, raw, "method.options")
        validate = getattr(opts, "validate", None)
        if validate is not None:
            validate("method.options")
        return opts


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    import fedmarket.methods  # noqa: F401  (registers the built-in methods)

    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


@dataclass
class NoOptions:
    pass


@dataclass
class ServerStepOptions:
    """The options of the server's step towards the aggregate, shared by every method whose server averages
    parameters (`fedmarket.federation.strategies.ServerStep`): ``server_optimizer`` "sgd" (default), "adam"
    (FedAdam) or "yogi" (FedYogi); ``server_lr`` η_g > 0 (sgd: 1 = plain FedAvg; adam/yogi: the per-coordinate
    step size); ``server_momentum`` β in [0, 1) (sgd: momentum, 0 = none; adam/yogi: β₁); ``server_beta2`` β₂ in
    [0, 1) and ``server_tau`` τ > 0 (adam/yogi only)."""

    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_optimizer: str = "sgd"
    server_beta2: float = 0.99
    server_tau: float = 1e-3

    def server_step(self) -> ServerStep:
        return ServerStep(
            self.server_optimizer, self.server_lr, self.server_momentum, self.server_beta2, self.server_tau
        )

    def server_step_kwargs(self) -> dict[str, Any]:
        """The server-step keyword arguments of the strategies (`FedAvg`, ...)."""
        return {
            "server_lr": self.server_lr,
            "server_momentum": self.server_momentum,
            "server_optimizer": self.server_optimizer,
            "server_beta2": self.server_beta2,
            "server_tau": self.server_tau,
        }

    def validate_server_step(self, prefix: str) -> None:
        try:
            self.server_step()
        except ValueError as err:  # the message starts with the option's name
            raise ConfigError(f"{prefix}.{err}") from None


@dataclass
class FedAvgOptions(ServerStepOptions):
    """Options of every FedAvg-family method: the server's aggregation rule (robust options included) and its
    step towards the aggregate (`ServerStepOptions`)."""

    aggregation: str = "mean"
    trim_ratio: float = 0.1

    def validate(self, prefix: str) -> None:
        if self.aggregation not in ("mean", "median", "trimmed_mean"):
            raise ConfigError(
                f"{prefix}.aggregation must be mean, median or trimmed_mean, got {self.aggregation!r}"
            )
        if not 0 <= self.trim_ratio < 0.5:
            raise ConfigError(f"{prefix}.trim_ratio must be in [0, 0.5), got {self.trim_ratio}")
        self.validate_server_step(prefix)

    def fedavg_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `fedmarket.federation.strategies.FedAvg` these options set."""
        return {
            "aggregation": self.aggregation,
            "trim_ratio": self.trim_ratio,
            **self.server_step_kwargs(),
        }


@dataclass
class FedProxOptions(FedAvgOptions):
    mu: float = 0.01

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.mu < 0:
            raise ConfigError(f"{prefix}.mu must be >= 0, got {self.mu}")
