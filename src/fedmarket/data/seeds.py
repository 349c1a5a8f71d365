"""Random streams keyed by market: the same (seed, market, salt) gives the same numbers in every process,
runtime and Python version. Below every data loader and split (`fedmarket.data.split`,
`fedmarket.data.mtl`), so that both may use it without importing each other.
"""

from __future__ import annotations

import zlib

import numpy as np


def market_seed(seed: int, market: str, *salt: int) -> np.random.SeedSequence:
    """A seed sequence that depends only on (seed, market name, salt...), stable across runs and Python."""
    return np.random.SeedSequence([int(seed), zlib.crc32(market.encode("utf-8")), *[int(s) for s in salt]])
