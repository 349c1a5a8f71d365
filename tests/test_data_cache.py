"""The Parquet market cache: hits, invalidation by content, atomic writes, faithful round trips."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmarket.data import MarketData, load_dataset
from fedmarket.data import cache as cache_module
from fedmarket.data.cache import cache_key, cached_markets
from fedmarket.data.paths import resolve_data_dir
from fedmarket.errors import DataError


def make_markets() -> dict[str, MarketData]:
    first = MarketData.from_raw(
        "b-market",
        np.array(["u1", "u2", "u1"], dtype=object),
        np.array(["x", "y", "y"], dtype=object),
        np.array([3, 1, 2]),
        ratings=np.array([1.0, 4.5, 5.0]),
        item_text=["text of x", ""],
        user_features=pd.DataFrame({"gender": [1, 2]}),
        item_features=pd.DataFrame({"genre": [0, 3], "year_bucket": [5, 6]}),
        meta={"population": "p", "sizes": {"genre": 19}, "array": np.arange(3)},
    )
    second = MarketData.from_raw("a/odd name", np.array([10, 20]), np.array([7, 7]), np.array([0, 0]))
    return {"b-market": first, "a/odd name": second}


class Builder:
    """build_fn that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, MarketData]:
        self.calls += 1
        return make_markets()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.txt"
    path.write_text("some source bytes\n")
    return path


def entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.rglob("*") if p.is_dir() and p.parent != cache_dir)


def test_second_load_hits_the_cache_and_round_trips(tmp_path: Path, source: Path) -> None:
    build = Builder()
    cache_dir = tmp_path / "cache"
    fresh = cached_markets("toy", "1", [source], {"k": 1}, build, cache_dir=cache_dir)
    cached = cached_markets("toy", "1", [source], {"k": 1}, build, cache_dir=cache_dir)
    assert build.calls == 1
    assert list(cached) == ["b-market", "a/odd name"]  # order kept, odd names allowed
    for name, market in fresh.items():
        again = cached[name]
        for attr in ("users", "items", "timestamps"):
            np.testing.assert_array_equal(getattr(again, attr), getattr(market, attr))
        assert list(again.user_ids) == list(market.user_ids)
        assert list(again.item_ids) == list(market.item_ids)
        assert again.item_text == market.item_text
    b = cached["b-market"]
    assert b.ratings.dtype == np.float32 and b.ratings.tolist() == [1.0, 4.5, 5.0]
    pd.testing.assert_frame_equal(b.user_features, fresh["b-market"].user_features)
    pd.testing.assert_frame_equal(b.item_features, fresh["b-market"].item_features)
    assert b.meta == {"population": "p", "sizes": {"genre": 19}, "array": [0, 1, 2]}  # meta goes through JSON
    odd = cached["a/odd name"]
    assert odd.ratings is None and odd.item_text is None and odd.user_features is None
    assert list(odd.user_ids) == [10, 20] and isinstance(odd.user_ids[0], int)  # integer ids stay integers


def test_changed_content_options_or_version_miss(tmp_path: Path, source: Path) -> None:
    build = Builder()
    cache_dir = tmp_path / "cache"

    def load(options: dict, version: str = "1") -> None:
        cached_markets("toy", version, [source], options, build, cache_dir=cache_dir)

    load({"k": 1})
    source.write_text("other source bytes, a different length\n")
    load({"k": 1})
    assert build.calls == 2
    load({"k": 2})
    load({"k": 2}, version="2")
    assert build.calls == 4
    load({"k": 1})
    assert build.calls == 4


def test_key_depends_on_content_not_location(tmp_path: Path, source: Path) -> None:
    moved = tmp_path / "elsewhere.txt"
    moved.write_bytes(source.read_bytes())
    assert cache_key("toy", "1", [source], {}) == cache_key("toy", "1", [moved], {})


def test_use_cache_false_builds_and_writes_nothing(tmp_path: Path, source: Path) -> None:
    build = Builder()
    for _ in range(2):
        cached_markets("toy", "1", [source], {}, build, use_cache=False, cache_dir=tmp_path / "cache")
    assert build.calls == 2
    assert not (tmp_path / "cache").exists()


def failing_after(count: int, error: BaseException):
    """A DataFrame.to_parquet that writes ``count`` files, then raises."""
    original = pd.DataFrame.to_parquet
    state = {"written": 0}

    def to_parquet(self, *args, **kwargs):
        if state["written"] >= count:
            raise error
        state["written"] += 1
        return original(self, *args, **kwargs)

    return to_parquet


def test_write_failing_midway_leaves_nothing_behind(tmp_path: Path, source: Path, monkeypatch) -> None:
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(pd.DataFrame, "to_parquet", failing_after(3, OSError("disk full")))
    build = Builder()
    with pytest.warns(UserWarning, match="disk full"):
        markets = cached_markets("toy", "1", [source], {}, build, cache_dir=cache_dir)
    assert set(markets) == {"b-market", "a/odd name"}  # the parsed data is still returned
    assert list((cache_dir / "toy").iterdir()) == []  # no entry and no temporary folder
    monkeypatch.undo()
    cached_markets("toy", "1", [source], {}, build, cache_dir=cache_dir)
    assert build.calls == 2  # nothing half-written was taken for a hit


def test_interrupted_write_propagates_and_leaves_nothing(tmp_path: Path, source: Path, monkeypatch) -> None:
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(pd.DataFrame, "to_parquet", failing_after(2, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        cached_markets("toy", "1", [source], {}, Builder(), cache_dir=cache_dir)
    assert list((cache_dir / "toy").iterdir()) == []


def test_corrupt_entry_is_rebuilt(tmp_path: Path, source: Path) -> None:
    cache_dir = tmp_path / "cache"
    build = Builder()
    cached_markets("toy", "1", [source], {}, build, cache_dir=cache_dir)
    next((cache_dir / "toy").rglob("0.inter.parquet")).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        markets = cached_markets("toy", "1", [source], {}, build, cache_dir=cache_dir)
    assert build.calls == 2 and markets["b-market"].num_interactions == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached_markets("toy", "1", [source], {}, build, cache_dir=cache_dir)
    assert build.calls == 2


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDMARKET_CACHE", str(tmp_path / "env-cache"))
    assert cache_module.resolve_cache_dir() == tmp_path / "env-cache"
    monkeypatch.delenv("FEDMARKET_CACHE")
    assert cache_module.resolve_cache_dir() == Path.home() / ".cache" / "fedmarket"


def test_real_loader_second_load_skips_parsing(tmp_path: Path, monkeypatch) -> None:
    try:
        resolve_data_dir(None)
    except DataError:
        pytest.skip("data directory not available")
    monkeypatch.setenv("FEDMARKET_CACHE", str(tmp_path / "cache"))
    first = load_dataset("xmrec", markets=["in", "es"])
    from fedmarket.data import xmarket

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed although cached")

    monkeypatch.setattr(xmarket, "parse_forec_file", no_parsing)
    monkeypatch.setattr(xmarket, "parse_recbole_inter", no_parsing)
    second = load_dataset("xmrec", markets=["in", "es"])
    for name in ("in", "es"):
        np.testing.assert_array_equal(first[name].items, second[name].items)
        assert list(first[name].item_ids) == list(second[name].item_ids)
    assert second["es"].ratings is None and second["in"].ratings is not None
