"""Payloads: what crosses the market boundary.

A payload is ``dict[str, numpy.ndarray]`` (it maps 1:1 to a Flower ``ArrayRecord``). Every method declares,
in one place, the key patterns that may leave a market (`UploadDeclaration`); the runtime checks every
upload against it, so an undeclared key is an error, never a silent leak.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedmarket.errors import PayloadError

Payload = dict[str, np.ndarray]


def payload_bytes(payload: Mapping[str, np.ndarray] | None) -> int:
    """Bytes of the arrays in a payload (what a transport must carry, ignoring framing)."""
    if not payload:
        return 0
    return int(sum(np.asarray(v).nbytes for v in payload.values()))


@dataclass(frozen=True)
class UploadDeclaration:
    """The parameter-name patterns (fnmatch) that a method lets leave a market, and why.

    Example: ``UploadDeclaration(("dense.*",), "dense layers; ID embeddings stay local")``.
    An empty pattern tuple means nothing ever leaves (Local).
    """

    patterns: tuple[str, ...]
    reason: str = ""

    def allows(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in self.patterns)

    def select(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if self.allows(k)]

    def check(self, payload: Mapping[str, np.ndarray], market: str) -> None:
        """Raise `PayloadError` if ``payload`` holds a key outside the declaration."""
        extra = sorted(k for k in payload if not self.allows(k))
        if extra:
            raise PayloadError(
                f"market {market!r} tried to upload undeclared keys {extra[:5]}"
                f"{' ...' if len(extra) > 5 else ''}; declared patterns: {list(self.patterns)}"
            )


def validate_update(
    payload: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray] | None, market: str
) -> None:
    """Reject NaN/Inf values and shapes or keys that differ from the reference (the last broadcast)."""
    for key, value in payload.items():
        arr = np.asarray(value)
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise PayloadError(f"market {market!r}: upload {key!r} contains NaN or Inf")
        if reference is not None and key in reference and np.shape(reference[key]) != arr.shape:
            raise PayloadError(
                f"market {market!r}: upload {key!r} has shape {arr.shape}, expected {np.shape(reference[key])}"
            )
    if reference is not None:
        unexpected = sorted(set(payload) - set(reference))
        if unexpected:
            raise PayloadError(f"market {market!r}: unexpected upload keys {unexpected[:5]}")


def module_to_payload(module: torch.nn.Module, declaration: UploadDeclaration) -> Payload:
    """Copy the declared parameters (and buffers) of ``module`` into a payload."""
    state = module.state_dict()
    return {k: state[k].detach().cpu().numpy().copy() for k in declaration.select(state)}


def load_payload_into(module: torch.nn.Module, payload: Mapping[str, np.ndarray]) -> None:
    """Overwrite the parameters named in ``payload``; every other parameter keeps its local value."""
    if not payload:
        return
    state = module.state_dict()
    missing = [k for k in payload if k not in state]
    if missing:
        raise PayloadError(f"payload keys {missing[:5]} are not parameters of {type(module).__name__}")
    with torch.no_grad():
        for key, value in payload.items():
            state[key].copy_(torch.as_tensor(np.asarray(value), dtype=state[key].dtype))
