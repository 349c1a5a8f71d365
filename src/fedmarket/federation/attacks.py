"""ATTACK SIMULATION: poisoned markets, for measuring robust aggregation. Never enabled by default.

A poisoned market trains honestly, then replaces its update Δ = θ_k − θ_down before uploading
(Blanchard et al. 2017; Fang et al. 2020 use the same families):

- ``scale``: θ_down + s·Δ (a boosted update, model replacement in the limit);
- ``sign_flip``: θ_down − s·Δ (pushes the model up the loss);
- ``noise``: θ_down + N(0, s²) per coordinate (random garbage of the right shape, finite, so the
  runtime's NaN/Inf and shape checks accept it).

The upload keeps the declared keys and shapes: only the server's aggregation can defend against it
(``method.options.aggregation: median | trimmed_mean``).
"""

from __future__ import annotations

import numpy as np

from fedmarket.data.split import market_seed
from fedmarket.federation.core import ClientTrainer, RoundConfig, TrainerWrapper, Update
from fedmarket.federation.payload import Payload

ATTACKS = ("scale", "sign_flip", "noise")


def poison_payload(
    upload: Payload, download: Payload, kind: str, scale: float, rng: np.random.Generator
) -> Payload:
    """The poisoned version of ``upload`` (see module docstring). Non-float arrays pass unchanged."""
    if kind not in ATTACKS:
        raise ValueError(f"attack kind must be one of {list(ATTACKS)}, got {kind!r}")
    out: Payload = {}
    for key in sorted(upload):
        arr = np.asarray(upload[key])
        if arr.dtype.kind != "f":
            out[key] = arr
            continue
        ref = np.asarray(download.get(key, np.zeros_like(arr)), dtype=np.float64)
        delta = arr.astype(np.float64) - ref
        if kind == "scale":
            new = ref + scale * delta
        elif kind == "sign_flip":
            new = ref - scale * delta
        else:
            new = ref + scale * rng.standard_normal(arr.shape)
        out[key] = new.astype(arr.dtype)
    return out


class PoisonedClient(TrainerWrapper):
    """A market whose uploads are poisoned (ATTACK SIMULATION). Evaluation and local state are untouched."""

    def __init__(self, inner: ClientTrainer, kind: str, scale: float) -> None:
        if kind not in ATTACKS:
            raise ValueError(f"attack kind must be one of {list(ATTACKS)}, got {kind!r}")
        super().__init__(inner)
        self.kind = kind
        self.scale = scale

    def fit(self, payload: Payload, config: RoundConfig) -> Update:
        update = self.inner.fit(payload, config)
        if not update.payload:
            return update
        rng = np.random.default_rng(market_seed(config.seed, f"__attack__{self.market}", config.round))
        poisoned = poison_payload(update.payload, payload or {}, self.kind, self.scale, rng)
        return Update(poisoned, update.num_examples, {**update.metrics, "poisoned": 1.0})


def poison_markets(
    trainers: dict[str, ClientTrainer], markets: list[str], kind: str, scale: float
) -> dict[str, ClientTrainer]:
    """Replace the named markets' trainers by poisoned ones (ATTACK SIMULATION)."""
    return {m: PoisonedClient(t, kind, scale) if m in markets else t for m, t in trainers.items()}
