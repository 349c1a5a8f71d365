"""Methods: one module per method family; importing this package registers them."""

from fedmarket.methods import (
    ctr_baselines,  # noqa: F401
    fedmm,  # noqa: F401
    floors,  # noqa: F401  (popularity, popularity_recency)
    mtl_baselines,  # noqa: F401
    pfmsmt,  # noqa: F401
    seq_baselines,  # noqa: F401  (FeCoSR and its baselines; imports fecosr)
)
from fedmarket.methods.base import METHODS, Method, get_method

__all__ = ["METHODS", "Method", "get_method"]
