"""Property-based checks (hypothesis): whatever a file or a market sends, fedmarket answers with one named
error or a valid result, never a traceback of another kind."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmarket.data.generic import parse_market_file
from fedmarket.errors import DataError, PayloadError
from fedmarket.federation.payload import UploadDeclaration, validate_num_examples, validate_update

SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

cell = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "2020-01-01", "2020-13-45", "nan", "NaN", "inf", "true", "1e309", '"', ",", "\\"]),
)
header = st.lists(
    st.sampled_from(["user", "item", "rating", "timestamp", "text", "extra", ""]), min_size=1, max_size=5
)


@SETTINGS
@given(
    header=header,
    rows=st.lists(st.lists(cell, min_size=0, max_size=6), max_size=8),
    raw=st.binary(max_size=40),
)
def test_any_csv_loads_or_fails_with_one_line_naming_the_file(tmp_path_factory, header, rows, raw) -> None:
    path = tmp_path_factory.mktemp("csv") / "market.csv"
    text = ",".join(header) + "\n" + "\n".join(",".join(r) for r in rows) + "\n"
    path.write_bytes(text.encode("utf-8", "surrogatepass") + raw)
    try:
        market = parse_market_file(path, "m")
    except DataError as err:
        message = str(err)
        assert str(path) in message and "\n" not in message
        return
    assert market.num_interactions > 0
    assert np.isfinite(market.timestamps).all()


@SETTINGS
@given(
    users=st.lists(
        st.one_of(st.text(max_size=5), st.integers(), st.none(), st.lists(st.integers(), max_size=2)),
        min_size=1,
        max_size=6,
    ),
    stamps=st.lists(
        st.one_of(st.integers(-(10**10), 10**10), st.booleans(), st.none(), st.floats()),
        min_size=1,
        max_size=6,
    ),
)
def test_any_parquet_loads_or_fails_with_one_line_naming_the_file(tmp_path_factory, users, stamps) -> None:
    n = min(len(users), len(stamps))
    frame = pd.DataFrame(
        {
            "user": pd.Series(users[:n], dtype=object),
            "item": ["i"] * n,
            "timestamp": pd.Series(stamps[:n], dtype=object),
        }
    )
    path = tmp_path_factory.mktemp("pq") / "market.parquet"
    try:
        frame.to_parquet(path)
    except Exception:  # noqa: BLE001 - pyarrow cannot write every mix; nothing to load then
        return
    try:
        parse_market_file(path, "m")
    except DataError as err:
        assert str(path) in str(err) and "\n" not in str(err)


scalar = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**20), 10**20),
    st.booleans(),
    st.text(max_size=4),
    st.none(),
    st.lists(st.floats(), max_size=2),
)


@SETTINGS
@given(
    metrics=st.dictionaries(
        st.one_of(st.text(max_size=12), st.sampled_from(["auc", "loss", "ndcg@10", "cold_auc"])),
        scalar,
        max_size=6,
    )
)
def test_any_metrics_are_checked_or_refused_with_the_market_named(metrics) -> None:
    declaration = UploadDeclaration(("w",))
    try:
        out = declaration.check_metrics(metrics, "jp")
    except PayloadError as err:
        assert "'jp'" in str(err)
        return
    assert set(out) == set(metrics)
    assert all(isinstance(v, float) and not math.isinf(v) for v in out.values())
    assert all(declaration.allows_metric(k) for k in out)


@SETTINGS
@given(count=scalar, uploaded=st.booleans())
def test_any_example_count_is_an_int_in_range_or_refused(count, uploaded) -> None:
    try:
        n = validate_num_examples(count, "jp", 10**9, uploaded)
    except PayloadError as err:
        assert "'jp'" in str(err)
        return
    assert isinstance(n, int) and (1 if uploaded else 0) <= n <= 10**9


arrays = st.one_of(
    st.integers(0, 4).map(lambda n: np.zeros(n, np.float32)),
    st.integers(0, 3).map(lambda n: np.full((n, 2), np.nan)),
    st.integers(0, 3).map(lambda n: np.arange(n)),
    st.just(np.array([np.inf])),
)


@SETTINGS
@given(
    upload=st.dictionaries(
        st.sampled_from(["w", "v", "dnn.0.weight", "features.embedding.item.weight"]), arrays, max_size=3
    )
)
def test_any_upload_is_accepted_only_when_declared_finite_and_shaped(upload) -> None:
    declaration = UploadDeclaration(("w", "dnn.*"))
    reference = {"w": np.zeros(2, np.float32), "dnn.0.weight": np.zeros(2, np.float32)}
    try:
        declaration.check(upload, "jp")
        validate_update(upload, reference, "jp")
    except PayloadError as err:
        assert "'jp'" in str(err)
        return
    assert set(upload) <= set(reference)
    assert all(np.shape(v) == np.shape(reference[k]) and np.isfinite(v).all() for k, v in upload.items())
