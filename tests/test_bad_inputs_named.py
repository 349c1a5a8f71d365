"""Bad inputs get one line naming the file, line, column or key; races and interrupts leave nothing torn."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest

from fedmarket.data.generic import parse_market_file
from fedmarket.errors import DataError


@pytest.mark.parametrize(
    "name, write, message",
    [
        (
            "utf.csv",
            lambda p: p.write_bytes(b"user,item\n" + b"u,i\n" * 48 + b"u,\xff\xfeitem\n"),
            r"line 50: not UTF-8",
        ),
        (
            "mixed.csv",
            lambda p: p.write_text("user,item,timestamp\nu,i,2020-01-01\nu,j,1600000000\n"),
            r"line 3: column 'timestamp': '1600000000' is a number among dates",
        ),
        (
            "lists.parquet",
            lambda p: pd.DataFrame({"user": [["a"], ["b"]], "item": ["x", "y"]}).to_parquet(p),
            r"row 1: column 'user': .*list or array",
        ),
        (
            "bools.parquet",
            lambda p: pd.DataFrame(
                {"user": ["a", "b"], "item": ["x", "y"], "timestamp": [True, False]}
            ).to_parquet(p),
            r"row 1: column 'timestamp': a boolean is not a time",
        ),
        (
            "long.csv",
            lambda p: p.write_text("user,item\nu,i\n" + "x" * 2_000_000 + ",j\n"),
            r"line 3: column 'user': an id longer",
        ),
    ],
)
def test_bad_files_are_named_to_the_line(tmp_path, name, write, message) -> None:
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError, match=message) as info:
        parse_market_file(path, "m")
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_two_runs_started_in_the_same_second_get_their_own_folders(tmp_path) -> None:
    from fedmarket.api import new_run_dir
    from fedmarket.config import config_from_dict

    cfg = config_from_dict({"name": "race", "output_dir": str(tmp_path)})
    made, errors = [], []

    def make():
        try:
            made.append(new_run_dir(cfg))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(made)) == 16


def test_a_resumed_seed_counts_the_seconds_before_the_resume(checkpointed_sim) -> None:
    sim = checkpointed_sim
    sim(2).run()
    resumed = sim(3).run(resume=True)
    assert resumed.elapsed_before > 0


def test_ctrl_c_is_one_line_with_the_resume_command(tmp_path, capsys, monkeypatch) -> None:
    from fedmarket import api, cli

    def interrupted(cfg, *a, **k):
        api.ACTIVE_RUN_DIR = tmp_path / "run-x"
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "run_experiment", interrupted)
    config = tmp_path / "c.yaml"
    config.write_text("name: c\n")
    assert cli.main(["run", str(config)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fedmarket: interrupted; continue with: fedmarket run --resume {tmp_path / 'run-x'}"]


def test_non_finite_config_values_are_named() -> None:
    from fedmarket.config import config_from_dict
    from fedmarket.errors import ConfigError

    for key in ("lr",):
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ConfigError, match=f"train.{key} must be a finite number > 0"):
                config_from_dict({"train": {key: bad}})
    assert np.isfinite(config_from_dict({"train": {"lr": 1e-3}}).train.lr)


def test_a_market_name_that_would_break_node_config_is_refused_at_load(tmp_path) -> None:
    from fedmarket.data import load_dataset

    (tmp_path / 'de"x.csv').write_text("user,item\nu,i\nu,j\nu,k\n")
    with pytest.raises(DataError, match=r"market name 'de\"x' is not allowed"):
        load_dataset("generic", path=str(tmp_path), use_cache=False)


def test_a_timestamp_beyond_an_int64_second_count_is_named(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("user,item,timestamp\nu,i,1\nu,j,1e300\n")
    with pytest.raises(DataError, match=r"line 3: column 'timestamp': '1e300' is out of range"):
        parse_market_file(path, "m")
