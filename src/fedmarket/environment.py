"""Environment defaults for every fedmarket entry point: no telemetry, no update checks, no downloads."""

import os

QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


def apply_quiet_env() -> None:
    """Set the defaults without overriding what the user exported."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
