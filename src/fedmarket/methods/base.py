"""The method registry. A method = client trainers + a server strategy + the declaration of what leaves a
market. Each method module registers itself with `register` and states its `UploadDeclaration` once, at
the top of the module, so a reader (and `tests/test_payload_declarations.py`) finds it in one place."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedmarket.config import ExperimentConfig, _build
from fedmarket.data.split import MarketSplit
from fedmarket.errors import ConfigError
from fedmarket.federation.core import ClientTrainer, Strategy
from fedmarket.federation.payload import UploadDeclaration

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

    def parse_options(self, raw: dict[str, Any]) -> Any:
        opts = _build(self.options, raw, "method.options")
        validate = getattr(opts, "validate", None)
        if validate is not None:
            validate("method.options")
        return opts

    def option_dict(self, raw: dict[str, Any]) -> dict[str, Any]:
        return dataclasses.asdict(self.parse_options(raw))


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


def check_server_step(prefix: str, server_lr: float, server_momentum: float) -> None:
    """The options of the server's step towards the aggregate (`fedmarket.federation.strategies.server_step`):
    ``server_lr`` η_g > 0 (1 = plain FedAvg), ``server_momentum`` β in [0, 1) (0 = none)."""
    if not server_lr > 0:
        raise ConfigError(f"{prefix}.server_lr must be > 0, got {server_lr}")
    if not 0 <= server_momentum < 1:
        raise ConfigError(f"{prefix}.server_momentum must be in [0, 1), got {server_momentum}")


@dataclass
class FedAvgOptions:
    """Options of every FedAvg-family method: the server's aggregation rule (robust options included) and its
    step towards the aggregate (``server_lr`` η_g, ``server_momentum`` β; `check_server_step`)."""

    aggregation: str = "mean"
    trim_ratio: float = 0.1
    server_lr: float = 1.0
    server_momentum: float = 0.0

    def validate(self, prefix: str) -> None:
        if self.aggregation not in ("mean", "median", "trimmed_mean"):
            raise ConfigError(
                f"{prefix}.aggregation must be mean, median or trimmed_mean, got {self.aggregation!r}"
            )
        if not 0 <= self.trim_ratio < 0.5:
            raise ConfigError(f"{prefix}.trim_ratio must be in [0, 0.5), got {self.trim_ratio}")
        check_server_step(prefix, self.server_lr, self.server_momentum)

    def fedavg_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `fedmarket.federation.strategies.FedAvg` these options set."""
        return {
            "aggregation": self.aggregation,
            "trim_ratio": self.trim_ratio,
            "server_lr": self.server_lr,
            "server_momentum": self.server_momentum,
        }


@dataclass
class FedProxOptions(FedAvgOptions):
    mu: float = 0.01

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.mu < 0:
            raise ConfigError(f"{prefix}.mu must be >= 0, got {self.mu}")
