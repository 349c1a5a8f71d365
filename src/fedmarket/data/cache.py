"""Parquet cache of parsed markets, so repeated runs skip parsing (ML-1M: a million rows per run).

An entry is keyed by what determines its content and nothing else:

* the SHA-1 of each source file's bytes (not its path or mtime: moving the data directory keeps the cache
  valid, editing a file invalidates it). Within one process the digest is memoised by
  (path, size, mtime, inode), so hashing ML-1M's 45 MB happens once per process;
* the loader's name and version string (bump the version whenever parsing changes);
* the loader's options (JSON, sorted keys).

Layout: ``<cache dir>/<loader>/<key>/manifest.json`` plus per market ``<i>.inter.parquet`` (users, items,
timestamps[, ratings]), ``<i>.users.parquet`` (raw ids), ``<i>.items.parquet`` (raw ids[, item_text]) and
optional ``<i>.user_features.parquet`` / ``<i>.item_features.parquet``; markets are numbered because their
names may be any string. ``meta`` is stored in the manifest as JSON, so it must be JSON-serialisable (numpy
arrays and scalars are converted to lists / Python numbers and come back as such).

Raw ids: an id array whose entries are all integers is stored as int64 and comes back as Python ints;
anything else is stored as strings and comes back as ``str`` (loaders produce string ids, so this is exact
for them). Feature frames come back with a fresh RangeIndex (rows are aligned with local indices anyway).

Writes are atomic: everything is written into a temporary folder next to the target, then moved into place
with one ``os.replace``. A failed or interrupted write removes the temporary folder, so a half-written entry
is never visible; a write that fails with an ordinary error only warns, because the cache is an
optimisation and the parsed markets are still good.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedmarket.data.market import MarketData

CACHE_ENV = "FEDMARKET_CACHE"
CACHE_FORMAT = 1  # layout of an entry; part of every key
_STALE_TMP_SECONDS = 24 * 3600

_digest_memo: dict[tuple[str, int, int, int], str] = {}


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$FEDMARKET_CACHE``, else ``~/.cache/fedmarket``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedmarket"


def file_digest(path: str | Path) -> str:
    """SHA-1 of the file's bytes, memoised per process by (path, size, mtime, inode)."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    digest = _digest_memo.get(memo_key)
    if digest is None:
        sha = hashlib.sha1()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        digest = sha.hexdigest()
        _digest_memo[memo_key] = digest
    return digest


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def cache_key(
    loader_name: str, version: str, source_files: Sequence[str | Path], options: Mapping[str, Any]
) -> str:
    """The entry name: SHA-1 over the loader, its version, the options and the source files' contents."""
    payload = {
        "format": CACHE_FORMAT,
        "loader": loader_name,
        "version": version,
        "options": options,
        "files": [file_digest(p) for p in source_files],
    }
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=_jsonable).encode()).hexdigest()


def cached_markets(
    loader_name: str,
    version: str,
    source_files: Sequence[str | Path],
    options: Mapping[str, Any],
    build_fn: Callable[[], dict[str, MarketData]],
    *,
    use_cache: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, MarketData]:
    """The markets ``build_fn()`` returns, read from the cache when an entry for the same inputs exists.

    ``build_fn`` must depend only on ``source_files`` and ``options``, and return markets in a fixed order
    (the order is kept). With ``use_cache=False`` this is just ``build_fn()``.
    """
    if not use_cache:
        return build_fn()
    root = resolve_cache_dir(cache_dir) / loader_name
    target = root / cache_key(loader_name, version, source_files, options)
    if (target / "manifest.json").is_file():
        try:
            return read_entry(target)
        except Exception as err:  # a corrupt entry (disk trouble, foreign edits): rebuild it
            warnings.warn(
                f"fedmarket cache entry {target} is unreadable ({err}); rebuilding it", stacklevel=2
            )
            shutil.rmtree(target, ignore_errors=True)
    markets = build_fn()
    try:
        write_entry(target, markets)
    except Exception as err:
        warnings.warn(f"could not write fedmarket cache entry {target}: {err}", stacklevel=2)
    return markets


def write_entry(target: Path, markets: Mapping[str, MarketData]) -> None:
    """Write ``markets`` as the entry ``target``, atomically (see the module docstring)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        manifest = {"format": CACHE_FORMAT, "markets": []}
        for index, market in enumerate(markets.values()):
            manifest["markets"].append(_write_market(tmp, index, market))
        # json last: a manifest exists only if every table was written
        (tmp / "manifest.json").write_text(json.dumps(manifest, default=_jsonable))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "manifest.json").is_file():
                raise
            # another process wrote the same entry first; its content is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_stale_tmp(parent: Path) -> None:
    """Temporary folders left by a killed process (SIGKILL skips cleanup) are removed after a day."""
    now = time.time()
    for entry in parent.glob(".*.tmp-*"):
        try:
            if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _id_column(ids: np.ndarray) -> tuple[str, np.ndarray]:
    values = list(ids)
    if values and all(isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_) for v in values):
        return "int", np.asarray(values, dtype=np.int64)
    return "str", np.asarray([str(v) for v in values], dtype=object)


def _write_market(folder: Path, index: int, market: MarketData) -> dict[str, Any]:
    inter = {"users": market.users, "items": market.items, "timestamps": market.timestamps}
    if market.ratings is not None:
        inter["ratings"] = np.asarray(market.ratings, dtype=np.float32)
    pd.DataFrame(inter).to_parquet(folder / f"{index}.inter.parquet", index=False)
    user_kind, user_ids = _id_column(market.user_ids)
    pd.DataFrame({"id": user_ids}).to_parquet(folder / f"{index}.users.parquet", index=False)
    item_kind, item_ids = _id_column(market.item_ids)
    items = {"id": item_ids}
    if market.item_text is not None:
        items["text"] = np.asarray(market.item_text, dtype=object)
    pd.DataFrame(items).to_parquet(folder / f"{index}.items.parquet", index=False)
    for attr in ("user_features", "item_features"):
        frame = getattr(market, attr)
        if frame is not None:
            frame.reset_index(drop=True).to_parquet(folder / f"{index}.{attr}.parquet", index=False)
    return {
        "name": market.name,
        "user_id_kind": user_kind,
        "item_id_kind": item_kind,
        "ratings": market.ratings is not None,
        "item_text": market.item_text is not None,
        "user_features": market.user_features is not None,
        "item_features": market.item_features is not None,
        "meta": market.meta,
    }


def _ids(values: np.ndarray, kind: str) -> np.ndarray:
    if kind == "int":
        return np.asarray([int(v) for v in values], dtype=object)
    return np.asarray([str(v) for v in values], dtype=object)


def read_entry(target: Path) -> dict[str, MarketData]:
    """Load the markets of a complete entry."""
    manifest = json.loads((target / "manifest.json").read_text())
    if manifest.get("format") != CACHE_FORMAT:
        raise ValueError(f"cache format {manifest.get('format')} != {CACHE_FORMAT}")
    markets: dict[str, MarketData] = {}
    for index, info in enumerate(manifest["markets"]):
        inter = pd.read_parquet(target / f"{index}.inter.parquet")
        users = pd.read_parquet(target / f"{index}.users.parquet")
        items = pd.read_parquet(target / f"{index}.items.parquet")
        features = {
            attr: pd.read_parquet(target / f"{index}.{attr}.parquet") if info[attr] else None
            for attr in ("user_features", "item_features")
        }
        markets[info["name"]] = MarketData(
            name=info["name"],
            users=inter["users"].to_numpy(dtype=np.int64),
            items=inter["items"].to_numpy(dtype=np.int64),
            timestamps=inter["timestamps"].to_numpy(dtype=np.int64),
            ratings=inter["ratings"].to_numpy(dtype=np.float32) if info["ratings"] else None,
            user_ids=_ids(users["id"].to_numpy(), info["user_id_kind"]),
            item_ids=_ids(items["id"].to_numpy(), info["item_id_kind"]),
            item_text=[str(t) for t in items["text"].to_numpy()] if info["item_text"] else None,
            meta=info["meta"],
            **features,
        )
    return markets
