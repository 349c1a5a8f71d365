"""The local training loop every client trainer runs: CTR (`ctr_trainer`), sequential (`seq_trainer`),
multi-task (`mtl_trainer`) and FedMM's RQ-VAE (`fedmm.client`).

One epoch (`run_epoch`): the trainer's batches in the trainer's order; per batch the forward pass and loss
(``loss_fn``), the reported value recorded, FedProx's term (μ/2)‖θ − θ̄‖² added when a `Proximal` is given,
then backward and the optimizer step. The trainers keep their own random streams: each draws its epoch's
permutation (and negatives) from its own seeded generator (`epoch_rng`; FedMM: a torch generator) and seeds
dropout from it (`seed_dropout`) in the order it always has, inside the batches it hands to the loop, so a
trainer's numbers do not depend on this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from fedmarket.data.seeds import market_seed

Batch = TypeVar("Batch")
LossFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor, int]]
"""``loss_fn(batch) -> (loss to minimise, value to report, batch size)``; the reported value is usually the
loss itself (FedMM's RQ-VAE reports its reconstruction term)."""


def epoch_rng(seed: int, market: str, server_round: int, epoch: int) -> np.random.Generator:
    """The generator of one (seed, market, round, epoch): permutation, negatives, dropout seed."""
    return np.random.default_rng(market_seed(seed, market, server_round, epoch))


def seed_dropout(rng: np.random.Generator) -> None:
    """Seed torch (dropout) from the epoch's generator: reproducible per (seed, market, round, epoch)."""
    torch.manual_seed(int(rng.integers(0, 2**31 - 1)))


def tied_parameters(
    model: torch.nn.Module, anchor: Mapping[str, torch.Tensor]
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, anchor value) for every anchor key that names a parameter of ``model``, in anchor order."""
    params = dict(model.named_parameters())
    return [(params[k], a) for k, a in anchor.items() if k in params]


def proximal_term(tied: list[tuple[torch.nn.Parameter, torch.Tensor]], mu: float) -> torch.Tensor:
    """FedProx (Li et al., MLSys 2020, eq. 2): (μ/2)‖θ − θ_global‖² over the tied parameters."""
    return 0.5 * mu * sum((p - a).pow(2).sum() for p, a in tied)


@dataclass
class Proximal:
    """The proximal term of one epoch: the parameters tied to the round's download and μ."""

    tied: list[tuple[torch.nn.Parameter, torch.Tensor]]
    mu: float

    @classmethod
    def of(cls, model: torch.nn.Module, anchor: Mapping[str, torch.Tensor], mu: float) -> Proximal | None:
        """None (no term) when μ ≤ 0 or no anchor key names a parameter of ``model``."""
        if mu <= 0 or not anchor:
            return None
        tied = tied_parameters(model, anchor)
        return cls(tied, mu) if tied else None

    def __call__(self) -> torch.Tensor:
        return proximal_term(self.tied, self.mu)


@dataclass
class EpochLoss:
    """The reported value and size of every batch of one epoch."""

    values: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    @property
    def mean(self) -> float:
        """The size-weighted mean over the epoch's batches (0 for an epoch without batches)."""
        total, count = 0.0, 0
        for value, size in zip(self.values, self.sizes, strict=True):
            total += value * size
            count += size
        return total / max(1, count)


def run_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    loss_fn: LossFn,
    *,
    proximal: Proximal | None = None,
) -> EpochLoss:
    """One pass over ``batches``: forward + loss, record, (+ proximal term), backward, step."""
    model.train()
    record = EpochLoss()
    for batch in batches:
        loss, reported, size = loss_fn(batch)
        record.values.append(float(reported.detach()))
        record.sizes.append(size)
        if proximal is not None:
            loss = loss + proximal()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return record


def run_epochs(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches_fn: Callable[[int], Iterable[Batch]],
    loss_fn: LossFn,
    *,
    epochs: int,
    proximal: Proximal | None = None,
) -> list[EpochLoss]:
    """``epochs`` passes of `run_epoch`; ``batches_fn(epoch)`` gives each epoch's batches."""
    return [run_epoch(model, optimizer, batches_fn(e), loss_fn, proximal=proximal) for e in range(epochs)]
