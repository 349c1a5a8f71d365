"""Secure aggregation, simulated in process: the server sees masked uploads and their sum, never one
market's update.

Protocol (the core of Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017; dropout recovery by revealing pair seeds, without its secret sharing and double masking):

1. Fixed-point quantisation: a market's vector x is encoded as integers modulo 2^64,
   q(x) = round(x · 2^f) mod 2^64 (two's complement, so negative values wrap and sums stay exact).
2. Pairwise masks: every pair of markets (i, j), i < j, shares a seed (in the real protocol from a
   Diffie-Hellman key agreement; here derived from (run seed, round, i, j)) and expands it into a uniform
   vector m_ij. Market i uploads y_i = q(x_i) + Σ_{j>i} m_ij − Σ_{j<i} m_ji (mod 2^64). Each y_i alone is
   uniformly random.
3. The server adds the y_i: the masks cancel, Σ_i y_i = Σ_i q(x_i) (mod 2^64), and decodes the sum.
   Error: at most n · 2^{−f−1} per coordinate (rounding), as long as |Σ x| · 2^f < 2^63.
4. Dropout after masking (`unmask_sum_with_dropouts`): a market that masked but whose upload never arrives
   leaves its pair masks uncancelled in the survivors' uploads. Each survivor reveals the seeds it shares
   with the dropped markets (`reveal_pair_seeds`), the server expands them and removes those masks, and the
   sum over the survivors decodes exactly. Bonawitz et al. recover the dropped market's key from Shamir
   shares of t survivors instead, and add a second, self mask so that a late-arriving upload of a market
   declared dropped cannot then be unmasked; this simulation has neither (a dropped market's late upload
   must be discarded, which the in-process runtime does by construction).

`SecureAggregation` wraps a strategy whose server step is a weighted sum: each market uploads
(n_k · θ_k, n_k) masked, the server learns Σ n_k θ_k and Σ n_k only, and hands the wrapped strategy the
single update Σ n_k θ_k / Σ n_k with weight Σ n_k (its weighted mean of one update is that value).
A round whose server step is not a sum (coordinate-wise median or trimmed mean, personalised
aggregation, FedMM's first codebook merge by k-means) cannot be computed from a sum: the wrapper
aggregates it in the clear and records why, and the run report says so. FedMM's later RQ-VAE rounds are
sums because its markets then upload the weighted sums themselves (u·G, u, n·θ) with weight 1 (example
count 1): the wrapper's mean of them, times its weight (the number of markets), is their sum.

This is a simulation for the in-process runtime (seeds derived in process, no key agreement). The Flower
apps do not use it: there the same sum rounds run Flower's own SecAgg+ (`fedmarket.flower.secagg`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmarket.data.split import market_seed
from fedmarket.errors import PayloadError
from fedmarket.federation.core import Strategy, StrategyWrapper, Update
from fedmarket.federation.payload import Payload

DEFAULT_FRACTION_BITS = 24


def quantize(x: np.ndarray, fraction_bits: int = DEFAULT_FRACTION_BITS) -> np.ndarray:
    """round(x · 2^f) as uint64 (two's complement). Non-finite input is refused: cast to an integer it would
    become INT64_MIN and silently corrupt the sum."""
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise PayloadError("secure aggregation: a value to quantise is NaN or infinite")
    scaled = np.round(x * 2.0**fraction_bits)
    if np.abs(scaled).max(initial=0) >= 2.0**62:
        raise OverflowError(f"value too large for {fraction_bits} fraction bits in 64-bit fixed point")
    return scaled.astype(np.int64).view(np.uint64)


def dequantize(q: np.ndarray, fraction_bits: int = DEFAULT_FRACTION_BITS) -> np.ndarray:
    return np.asarray(q, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**fraction_bits


def pair_seed(seed: int, a: str, b: str, server_round: int) -> np.random.SeedSequence:
    """The seed markets ``a`` and ``b`` share in ``server_round`` (in the real protocol: a Diffie-Hellman key)."""
    lo, hi = sorted((a, b))
    return market_seed(seed, f"__secagg__{lo}|{hi}", server_round)


def pair_mask(pair_seed_value: np.random.SeedSequence, size: int) -> np.ndarray:
    """The uniform mask vector a pair seed expands to (uint64, arithmetic modulo 2^64)."""
    rng = np.random.default_rng(pair_seed_value)
    return rng.integers(0, 2**64, size=size, dtype=np.uint64, endpoint=False)


def pairwise_masks(markets: list[str], size: int, seed: int, server_round: int) -> dict[str, np.ndarray]:
    """Mask of each market: Σ_{j>i} m_ij − Σ_{j<i} m_ji (mod 2^64); the masks of all markets sum to 0."""
    order = sorted(markets)
    masks = {m: np.zeros(size, dtype=np.uint64) for m in order}
    for i, a in enumerate(order):
        for b in order[i + 1 :]:
            pair = pair_mask(pair_seed(seed, a, b, server_round), size)
            masks[a] += pair  # uint64 arithmetic wraps modulo 2^64
            masks[b] -= pair
    return masks


def mask_uploads(
    vectors: dict[str, np.ndarray], seed: int, server_round: int, fraction_bits: int = DEFAULT_FRACTION_BITS
) -> dict[str, np.ndarray]:
    """What each market sends: its quantised vector plus its mask (uniformly random on its own)."""
    size = len(next(iter(vectors.values())))
    masks = pairwise_masks(list(vectors), size, seed, server_round)
    return {m: quantize(v, fraction_bits) + masks[m] for m, v in vectors.items()}


def unmask_sum(masked: dict[str, np.ndarray], fraction_bits: int = DEFAULT_FRACTION_BITS) -> np.ndarray:
    """Server side: add the masked uploads modulo 2^64 (masks cancel) and decode."""
    total = np.zeros_like(next(iter(masked.values())))
    for y in masked.values():
        total += y
    return dequantize(total, fraction_bits)


def secure_sum(
    vectors: dict[str, np.ndarray], seed: int, server_round: int, fraction_bits: int = DEFAULT_FRACTION_BITS
) -> np.ndarray:
    """Σ_k vectors[k], computed by the server from masked uploads only."""
    return unmask_sum(mask_uploads(vectors, seed, server_round, fraction_bits), fraction_bits)


def reveal_pair_seeds(
    survivor: str, dropped: list[str], seed: int, server_round: int
) -> dict[str, np.random.SeedSequence]:
    """What a surviving market tells the server in the recovery step: the seed it shares with each market
    that dropped after masking (and nothing about its own vector: those masks hide no survivor's input)."""
    return {d: pair_seed(seed, survivor, d, server_round) for d in dropped if d != survivor}


def unmask_sum_with_dropouts(
    masked: dict[str, np.ndarray],
    revealed: dict[str, dict[str, np.random.SeedSequence]],
    fraction_bits: int = DEFAULT_FRACTION_BITS,
) -> np.ndarray:
    """Server side with dropouts: Σ over the markets whose masked upload arrived (``masked``), given each
    survivor's revealed seeds with the dropped markets (``revealed[survivor][dropped] = seed``). Survivor a
    holds +m_ab for a dropped b > a and −m_ba for b < a; the server adds the survivors' uploads and removes
    exactly those terms."""
    total = np.zeros_like(next(iter(masked.values())))
    for y in masked.values():
        total += y
    size = total.size
    for survivor in masked:
        for dropped, s in revealed.get(survivor, {}).items():
            if dropped in masked:
                raise ValueError(f"market {dropped!r} uploaded; revealing its pair seed would unmask it")
            pair = pair_mask(s, size)
            if survivor < dropped:
                total -= pair
            else:
                total += pair
    return dequantize(total, fraction_bits)


def secure_sum_with_dropouts(
    vectors: dict[str, np.ndarray],
    dropped: list[str],
    seed: int,
    server_round: int,
    fraction_bits: int = DEFAULT_FRACTION_BITS,
) -> np.ndarray:
    """Every market in ``vectors`` masks (masks agreed among all of them); the ``dropped`` ones never
    deliver their upload; the survivors reveal their pair seeds with the dropped ones; the server returns
    Σ over the survivors."""
    masked = mask_uploads(vectors, seed, server_round, fraction_bits)
    survivors = {m: y for m, y in masked.items() if m not in dropped}
    if not survivors:
        raise ValueError("every market dropped: nothing to aggregate")
    revealed = {m: reveal_pair_seeds(m, list(dropped), seed, server_round) for m in survivors}
    return unmask_sum_with_dropouts(survivors, revealed, fraction_bits)


def summer(seed: int, fraction_bits: int = DEFAULT_FRACTION_BITS) -> Any:
    """A ``(round, {market: vector}) -> sum`` function for `fedmarket.federation.privacy.PrivateStrategy`."""

    def _sum(server_round: int, vectors: dict[str, np.ndarray]) -> np.ndarray:
        return secure_sum(vectors, seed, server_round, fraction_bits)

    return _sum


def server_step_kind(strategy: Strategy, server_round: int) -> tuple[bool, str]:
    """(is the server step of ``server_round`` a weighted sum?, why): the strategy's own `Strategy.step_kind`
    (default: not a sum, so secure aggregation never silently changes a method's server step)."""
    return strategy.step_kind(server_round)


class SecureAggregation(StrategyWrapper):
    """Wraps a weighted-sum strategy so the server only learns Σ_k n_k θ_k and Σ_k n_k (see module doc)."""

    def __init__(self, inner: Strategy, seed: int = 0, fraction_bits: int = DEFAULT_FRACTION_BITS) -> None:
        super().__init__(inner)
        self.seed = seed
        self.fraction_bits = fraction_bits
        self.log: list[dict[str, Any]] = []
        self.last_masked: dict[str, np.ndarray] = {}  # what the server saw last round (tests, audits)

    def aggregate_train(self, server_round: int, updates: dict[str, Update]) -> None:
        uploaded = {m: u for m, u in updates.items() if u.payload}
        is_sum, why = server_step_kind(self.inner, server_round)
        if not uploaded:
            self.inner.aggregate_train(server_round, updates)
            return
        if not is_sum:
            self.log.append({"round": server_round, "secure": False, "reason": why})
            self.inner.aggregate_train(server_round, updates)
            return
        self.inner.aggregate_train(server_round, {"__secure_sum__": self.aggregate(server_round, uploaded)})
        self.log.append({"round": server_round, "secure": True, "reason": why})

    def aggregate(self, server_round: int, uploaded: dict[str, Update]) -> Update:
        """Σ n_k θ_k / Σ n_k from masked uploads of (n_k θ_k, n_k)."""
        first = next(iter(uploaded.values())).payload
        keys = sorted(first)
        vectors = {
            m: np.concatenate(
                [float(u.num_examples) * np.asarray(u.payload[k], dtype=np.float64).ravel() for k in keys]
                + [np.array([float(u.num_examples)])]
            )
            for m, u in uploaded.items()
        }
        self.last_masked = mask_uploads(vectors, self.seed, server_round, self.fraction_bits)
        total = unmask_sum(self.last_masked, self.fraction_bits)
        weight = total[-1]
        out: Payload = {}
        offset = 0
        for k in keys:
            arr = np.asarray(first[k])
            out[k] = (total[offset : offset + arr.size] / weight).reshape(arr.shape).astype(arr.dtype)
            offset += arr.size
        return Update(out, max(1, round(weight)), {})

    def privacy_report(self) -> dict[str, Any]:
        secured = [r["round"] for r in self.log if r["secure"]]
        clear = [r for r in self.log if not r["secure"]]
        return {
            "secure_aggregation": {
                "fraction_bits": self.fraction_bits,
                "secured_rounds": secured,
                "clear_rounds": [r["round"] for r in clear],
                "clear_reasons": sorted({r["reason"] for r in clear}),
            }
        }

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "log": list(self.log)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.log = list(state["log"])
