"""Errors that name what is wrong and where."""


class FedmarketError(Exception):
    """Base class of every error fedmarket raises on purpose."""


class DataError(FedmarketError):
    """Bad input data: missing file or column, unparseable row, empty or unknown market."""


class ConfigError(FedmarketError):
    """Bad experiment configuration: unknown key or invalid value (the message names the key)."""


class PayloadError(FedmarketError):
    """A payload that a method did not declare, or with NaN/Inf or wrong shapes."""
