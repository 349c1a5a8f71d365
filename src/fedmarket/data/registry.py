"""One entry point for every dataset: ``load_dataset(name, ...)`` → ``{market name: MarketData}``.

Each dataset declares its options with their defaults here, so a misspelt option in a config is an error
that names it instead of being silently ignored.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from fedmarket.data import generic, movielens, mtl, recbole, synthetic, xmarket
from fedmarket.data._tables import select_markets
from fedmarket.data.market import MarketData
from fedmarket.errors import DataError


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one dataset.

    ``load(data_dir, markets, use_cache, **options)`` returns the markets; ``options`` maps each accepted
    option to its default (``REQUIRED`` when it has none).
    """

    description: str
    load: Callable[..., dict[str, MarketData]]
    options: Mapping[str, Any] = field(default_factory=dict)


REQUIRED = object()


def _load_xmrec(data_dir, markets, use_cache, metadata):
    return xmarket.load_xmrec(data_dir, markets, use_cache, metadata=metadata)


def _movielens(split: str) -> Callable[..., dict[str, MarketData]]:
    def load(data_dir, markets, use_cache, include_ml100k=False):
        return movielens.load_movielens(split, data_dir, markets, use_cache, include_ml100k=include_ml100k)

    return load


def _load_recbole(data_dir, markets, use_cache, path, item_text):
    # a relative path may name a folder inside the data directory (a shared copy of a RecBole dataset)
    return recbole.load_recbole(path, data_dir, markets, use_cache, item_text=item_text)


def _load_generic(data_dir, markets, use_cache, path):
    del data_dir  # the user's own files are named by `path`, not looked up in the shared data folder
    return generic.load_generic(path, markets, use_cache)


def _load_synthetic(data_dir, markets, use_cache, **options):
    del data_dir, use_cache  # generated in well under a second; nothing to cache
    generated = synthetic.make_synthetic_markets(**options)
    names = select_markets(markets, list(generated), "synthetic")
    return {name: generated[name] for name in names}


def _ml1m_proxy(scenario: str) -> Callable[..., dict[str, Any]]:
    def load(
        data_dir,
        markets,
        use_cache,
        negatives_per_positive=2,
        seed=0,
        negatives_from="global",
        split="random",
    ):
        return mtl.load_ml1m_proxy(
            scenario, data_dir, markets, use_cache, negatives_per_positive, seed, negatives_from, split
        )

    return load


def _load_aliexpress(data_dir, markets, use_cache, path, country):
    del use_cache  # CSVs parse in well under a second at fixture size; nothing cached yet
    return mtl.load_aliexpress(path, data_dir, markets, country)


def _load_aliccp(data_dir, markets, use_cache, path):
    del use_cache
    return mtl.load_aliccp(path, data_dir, markets)


def _load_synthetic_mtl(data_dir, markets, use_cache, **options):
    del data_dir, use_cache
    return mtl.load_synthetic_mtl(markets, **options)


_SYNTHETIC_MTL_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(mtl.load_synthetic_mtl).parameters.items()
    if name != "markets"
}

_SYNTHETIC_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(synthetic.make_synthetic_markets).parameters.items()
}

DATASETS: dict[str, DatasetSpec] = {
    "xmrec": DatasetSpec(
        "XMarket Electronics: FOREC ca, de, fr, in, jp, mx, uk + CAT-SR es (8 markets, ASIN items)",
        _load_xmrec,
        {"metadata": None},
    ),
    "movielens-zip": DatasetSpec(
        "ML-1M by first zip digit, zip0..zip9 (homogeneous control); include_ml100k adds ml100k",
        _movielens("zip"),
        {"include_ml100k": False},
    ),
    "movielens-age": DatasetSpec(
        "ML-1M by age group, age1..age56 (heterogeneous), plus ml100k unless include_ml100k=False",
        _movielens("age"),
        {"include_ml100k": True},
    ),
    "ml100k": DatasetSpec("MovieLens-100K as one market", _movielens("ml100k")),
    "ml1m": DatasetSpec("MovieLens-1M as one market", _movielens("ml1m")),
    "generic": DatasetSpec(
        "your own files: path = one CSV/Parquet per market or a folder of them (user, item[, rating, timestamp, text])",
        _load_generic,
        {"path": REQUIRED},
    ),
    "recbole": DatasetSpec(
        "RecBole atomic files: path = a folder of <market>.inter files or of one-.inter subfolders "
        "(optional <market>.item gives item text)",
        _load_recbole,
        {"path": REQUIRED, "item_text": None},
    ),
    "synthetic": DatasetSpec(
        "generated markets with shared latent concepts and market drift (tests and illustrations only)",
        _load_synthetic,
        _SYNTHETIC_DEFAULTS,
    ),
    # multi-task (click + conversion per impression) scenarios: `fedmarket.data.mtl.MTLMarket`, not MarketData
    "ml1m-proxy-age": DatasetSpec(
        "ML-1M multi-task PROXY (impressions, click = rated, conversion = 5 stars), scenario = age group (7)",
        _ml1m_proxy("age"),
        {"negatives_per_positive": 2, "seed": 0, "negatives_from": "global", "split": "random"},
    ),
    "ml1m-proxy-zip": DatasetSpec(
        "ML-1M multi-task PROXY, scenario = first zip digit (10; the homogeneous control)",
        _ml1m_proxy("zip"),
        {"negatives_per_positive": 2, "seed": 0, "negatives_from": "global", "split": "random"},
    ),
    "aliexpress": DatasetSpec(
        "AliExpress CSV layout (one country = one scenario); default path = the mtl-samples schema fixture",
        _load_aliexpress,
        {"path": None, "country": "us"},
    ),
    "aliccp": DatasetSpec(
        "Ali-CCP CSV layout, scenario = field 301; default path = the mtl-samples schema fixture",
        _load_aliccp,
        {"path": None},
    ),
    "synthetic-mtl": DatasetSpec(
        "synthetic scenarios as click/conversion impressions with a task_conflict knob (tests, illustrations)",
        _load_synthetic_mtl,
        _SYNTHETIC_MTL_DEFAULTS,
    ),
}


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _coerce(dataset: str, option: str, value: Any, default: Any) -> Any:
    """Text from the command line (``--option include_ml100k=false``) → the type of the option's default, so
    that ``"false"`` does not count as true. Values that are not strings are used as given."""
    if not isinstance(value, str) or default is None or default is REQUIRED or isinstance(default, str):
        return value
    text = value.strip()
    try:
        if isinstance(default, bool):
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple | list):
            return tuple(int(part) for part in text.replace("(", "").replace(")", "").split(","))
    except ValueError:
        raise DataError(
            f"dataset {dataset!r}: option {option!r} = {value!r} is not a valid {type(default).__name__}"
        ) from None
    return value


def _check_options(name: str, spec: DatasetSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    for option in options:
        if option not in spec.options:
            valid = ", ".join(spec.options) or "none"
            raise DataError(f"dataset {name!r} has no option {option!r}; valid options: {valid}")
    merged = {
        **spec.options,
        **{key: _coerce(name, key, value, spec.options[key]) for key, value in options.items()},
    }
    for option, value in merged.items():
        if value is REQUIRED:
            raise DataError(f"dataset {name!r} needs option {option!r}")
    return merged


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    markets: Sequence[str] | None = None,
    use_cache: bool = True,
    **options: Any,
) -> dict[str, MarketData]:
    """The markets of dataset ``name`` (see :data:`DATASETS`), all or the ``markets`` asked for, in that order.

    ``data_dir`` defaults as in :func:`fedmarket.data.paths.resolve_data_dir`; real-data loaders keep a
    Parquet cache (:mod:`fedmarket.data.cache`) unless ``use_cache=False``. ``options`` are the dataset's own
    (e.g. ``include_ml100k`` for MovieLens, ``path`` for ``generic``, generator arguments for ``synthetic``).
    """
    spec = _spec(name)
    merged = _check_options(name, spec, options)
    if name == "generic":
        merged["path"] = Path(merged["path"]).expanduser().absolute()  # relative to the working directory
    loaded = spec.load(data_dir, markets, use_cache, **merged)
    for market in loaded:
        check_market_name(market, f"dataset {name!r}")
    return loaded


MARKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_market_name(market: str, where: str) -> None:
    """A market name travels in file names, reports and Flower's ``--node-config 'market="…"'``: letters,
    digits, '.', '_' and '-' only (a quote or a space would break them), at most 64 characters."""
    if not isinstance(market, str) or not MARKET_NAME.fullmatch(market):
        raise DataError(
            f"{where}: market name {market!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (rename the file or the market)"
        )


def dataset_info(
    name: str,
    data_dir: str | Path | None = None,
    markets: Sequence[str] | None = None,
    use_cache: bool = True,
    **options: Any,
) -> pd.DataFrame:
    """One row per market (for ``fedmarket data info``): market, users, items, interactions, density, the
    repeated (user, item) rows protocol 2 collapses, and where time comes from."""
    from fedmarket.data.split import collapse_repeats

    loaded = load_dataset(name, data_dir, markets, use_cache, **options)
    rows = []
    for market in loaded.values():
        row = market.summary()
        if hasattr(market, "items") and hasattr(market, "timestamps"):
            row["repeated_rows"] = int(market.num_interactions - collapse_repeats(market)[0].num_interactions)
            row["time"] = market.meta.get("time", "timestamp")
        rows.append(row)
    return pd.DataFrame(rows)
