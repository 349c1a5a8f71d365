"""Payloads: what crosses the market boundary.

A payload is ``dict[str, numpy.ndarray]`` (it maps 1:1 to a Flower ``ArrayRecord``). Every method declares,
in one place, the key patterns that may leave a market (`UploadDeclaration`); the runtime checks every
upload against it, so an undeclared key is an error, never a silent leak.

Metrics leave a market too (training metrics with each upload, validation and test metrics per market), so
the same declaration names the metric keys a market may report (`UploadDeclaration.metric_patterns`: the
shared evaluation and training metrics, plus the method's own ``metrics``), and each value must be a real
scalar, finite or NaN ("not computed"). `UploadDeclaration.check_metrics` enforces it: in the in-process
runtime, on the Flower client before sending and on the Flower server on receipt.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmarket.errors import PayloadError

Payload = dict[str, np.ndarray]


def payload_bytes(payload: Mapping[str, np.ndarray] | None) -> int:
    """Bytes of the arrays in a payload (what a transport must carry, ignoring framing)."""
    if not payload:
        return 0
    return int(sum(np.asarray(v).nbytes for v in payload.values()))


EVALUATION_METRICS = (
    "auc",
    "logloss",
    "gauc",
    "hr@*",
    "ndcg@*",
    "mrr@*",
    "full_hr@*",
    "full_ndcg@*",
    "full_mrr@*",
    "cold_*",
    "ctr_auc",
    "ctcvr_auc",
    "ctr_logloss",
    "ctcvr_logloss",
    "mean_auc",
)
"""Metrics every method may report per market (aggregates over a market's held-out users; no per-user value)."""
TRAINING_METRICS = ("loss", "dp_update_norm", "dp_clipped", "poisoned")
"""Per-round training metrics sent with an upload (the mean train loss; what the DP and attack-simulation
wrappers add)."""


@dataclass(frozen=True)
class UploadDeclaration:
    """The parameter-name patterns (fnmatch) that a method lets leave a market, and why; and the metric keys
    beyond the shared ones (`EVALUATION_METRICS`, `TRAINING_METRICS`) it may report.

    Example: ``UploadDeclaration(("dense.*",), "dense layers; ID embeddings stay local")``.
    An empty pattern tuple means no parameter ever leaves (Local); metrics still do.
    """

    patterns: tuple[str, ...]
    reason: str = ""
    metrics: tuple[str, ...] = ()

    @property
    def metric_patterns(self) -> tuple[str, ...]:
        return (*EVALUATION_METRICS, *TRAINING_METRICS, *self.metrics)

    def allows_metric(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in self.metric_patterns)

    def check_metrics(
        self, metrics: Mapping[str, object], market: str, where: str = "metrics"
    ) -> dict[str, float]:
        """The metrics as floats; `PayloadError` naming the market and the key if one is undeclared or not a
        real scalar (finite or NaN: a value that could not be computed)."""
        out: dict[str, float] = {}
        for key, value in metrics.items():
            if not isinstance(key, str) or not self.allows_metric(key):
                raise PayloadError(
                    f"market {market!r} tried to report undeclared {where} key {key!r}; declared metric patterns: "
                    f"{list(self.metric_patterns)}"
                )
            if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
                raise PayloadError(
                    f"market {market!r}: {where} {key!r} must be a real scalar, got {type(value).__name__}"
                )
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if math.isinf(number):
                raise PayloadError(f"market {market!r}: {where} {key!r} is {value} (must be finite or NaN)")
            out[key] = number
        return out

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


def validate_num_examples(num_examples: object, market: str, maximum: int, uploaded: bool = True) -> int:
    """A market's reported example count (its aggregation weight) as an int; `PayloadError` naming the market
    unless it is a finite integer, positive when the market uploaded something (0 allowed with an empty
    upload), and at most ``maximum``. A NaN count would otherwise poison the weighted mean (or, quantised for
    secure aggregation, become INT64_MIN), and a negative one would break it."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | float | np.integer | np.floating):
        raise PayloadError(
            f"market {market!r}: num_examples must be a number, got {type(num_examples).__name__}"
        )
    try:
        value = float(num_examples)
    except OverflowError:
        value = math.inf
    if not np.isfinite(value) or value != int(value):
        raise PayloadError(f"market {market!r}: num_examples must be a finite integer, got {num_examples}")
    lowest = 1 if uploaded else 0
    if value < lowest or value > maximum:
        raise PayloadError(
            f"market {market!r}: num_examples {int(value)} outside [{lowest}, {maximum}] (train.max_examples)"
        )
    return int(value)


def upload_digest(payload: Mapping[str, np.ndarray]) -> str:
    """A SHA-256 over an upload's keys, dtypes, shapes and bytes (to recognise a replayed upload)."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(payload):
        arr = np.ascontiguousarray(payload[key])
        digest.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
        digest.update(arr.tobytes())
    return digest.hexdigest()


def check_not_replayed(payload: Mapping[str, np.ndarray], market: str, last: dict[str, str]) -> None:
    """`PayloadError` if ``market`` sends exactly the non-empty upload it sent last time (a replay: training
    always moves the parameters); ``last`` (market -> digest) is updated."""
    if not payload:
        return
    digest = upload_digest(payload)
    if last.get(market) == digest:
        raise PayloadError(
            f"market {market!r} sent the very upload it sent before (a replayed, stale upload)"
        )
    last[market] = digest


def upload_contract(download: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The keys and shapes a market may send back for ``download`` (`Strategy.upload_contract`'s default):
    the download's own."""
    return {k: tuple(int(d) for d in np.shape(v)) for k, v in download.items()}


def _shape(value: Any) -> tuple[int, ...]:
    """A contract entry's shape: an array's, or a shape given as a tuple/list of ints."""
    if isinstance(value, (tuple, list)):
        return tuple(int(d) for d in value)
    return tuple(np.shape(value))


def validate_update(
    payload: Mapping[str, np.ndarray], reference: Mapping[str, Any] | None, market: str
) -> None:
    """Reject NaN/Inf values and shapes or keys that differ from the reference: the round's upload contract
    (key -> shape, `upload_contract`), or the broadcast arrays themselves."""
    for key, value in payload.items():
        arr = np.asarray(value)
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise PayloadError(f"market {market!r}: upload {key!r} contains NaN or Inf")
        if reference is not None and key in reference and _shape(reference[key]) != arr.shape:
            raise PayloadError(
                f"market {market!r}: upload {key!r} has shape {arr.shape}, expected {_shape(reference[key])}"
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
