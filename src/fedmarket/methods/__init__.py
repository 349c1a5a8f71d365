"""Methods: one module per method family; importing this package registers them."""

from fedmarket.methods import (
    ctr_baselines,  # noqa: F401
    fedmm,  # noqa: F401
    mtl_baselines,  # noqa: F401
    pfmsmt,  # noqa: F401
)
from fedmarket.methods.base import METHODS, Method, get_method

__all__ = ["METHODS", "Method", "get_method"]
