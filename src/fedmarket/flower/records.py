"""What travels in a Flower message: a payload as an ``ArrayRecord`` (1:1, key by key) and a JSON envelope.

A fedmarket payload is ``dict[str, numpy.ndarray]``; an ``ArrayRecord`` is an ordered mapping of named
arrays, so the mapping is exact (dtype, shape and bytes are preserved, which the equivalence test relies
on). Everything else a message needs (the experiment config, the round, the split, per-market metrics) is
small and nested, so it travels as one JSON string inside a ``ConfigRecord``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedmarket.federation.payload import Payload
from fedmarket.serialization import json_default

ENVELOPE = "fedmarket"  # ConfigRecord holding the JSON envelope
ARRAYS = "arrays"  # ArrayRecord holding the payload
METRICS = "metrics"  # MetricRecord of a train reply (num_examples + the trainer's metrics)


def payload_to_record(payload: Mapping[str, np.ndarray] | None) -> ArrayRecord:
    """A payload as an ``ArrayRecord`` with the same keys, dtypes, shapes and values."""
    return ArrayRecord(array_dict={k: Array(np.asarray(v, order="C")) for k, v in (payload or {}).items()})


def record_to_payload(record: ArrayRecord | None) -> Payload:
    """The inverse of `payload_to_record` (arrays are writable copies)."""
    if record is None:
        return {}
    return {k: np.array(v.numpy(), copy=True) for k, v in record.items()}


def envelope(**fields: Any) -> ConfigRecord:
    return ConfigRecord({"json": json.dumps(fields, default=json_default)})


def open_envelope(record: ConfigRecord) -> dict[str, Any]:
    return json.loads(str(record["json"]))
