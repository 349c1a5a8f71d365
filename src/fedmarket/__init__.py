"""fedmarket: federated recommendation across markets whose raw data never leaves them."""

from fedmarket.errors import ConfigError, DataError, FedmarketError

__version__ = "0.1.0"
__all__ = ["ConfigError", "DataError", "FedmarketError", "__version__"]
