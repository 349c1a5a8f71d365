"""Where the raw data lives.

The data may never be committed to the project (research-only terms, MovieLens forbids redistribution),
so every loader reads it from a configurable directory instead of a path inside the package.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedmarket.errors import DataError

DATA_ENV = "FEDMARKET_DATA"


def _default_candidates() -> list[Path]:
    """The conventional places, in order: ``../shared/data`` from the working directory (running from the
    project root), then next to the repository this file belongs to (running from anywhere else)."""
    repo_root = Path(__file__).resolve().parents[3]
    return [Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"]


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$FEDMARKET_DATA``, else the first existing default.

    An explicit argument or environment variable that points nowhere is an error rather than a silent
    fall-back, so a typo cannot make a run read some other copy of the data.
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DataError(
                f"data directory {str(path)!r} (given explicitly) does not exist or is not a folder"
            )
        return path.resolve()
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(
                f"data directory {str(path)!r} (from ${DATA_ENV}) does not exist or is not a folder"
            )
        return path.resolve()
    tried = _default_candidates()
    for path in tried:
        if path.is_dir():
            return path.resolve()
    tried_text = ", ".join(repr(str(p.resolve())) for p in tried)
    raise DataError(
        f"no data directory found: ${DATA_ENV} is not set and none of {tried_text} exists; "
        f"pass data_dir=... (CLI: --data-dir) or set {DATA_ENV}=/path/to/shared/data"
    )


def require_file(path: Path) -> Path:
    """``path`` if it is a readable file, else a DataError naming it (loaders call this before parsing)."""
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} not found")
    return path
