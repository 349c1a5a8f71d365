"""fedmarket: federated recommendation across markets whose raw data never leaves them."""

from fedmarket.errors import ConfigError, DataError, FedmarketError


def _version() -> str:
    """The installed distribution's version; in a source tree that is not installed, pyproject.toml's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedmarket")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


__version__ = _version()
__all__ = ["ConfigError", "DataError", "FedmarketError", "__version__"]
