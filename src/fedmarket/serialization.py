"""JSON for results and Flower envelopes: numpy scalars and arrays become plain numbers and lists."""

from typing import Any

import numpy as np


def json_default(o: Any) -> Any:
    """``json.dumps(..., default=json_default)``."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
