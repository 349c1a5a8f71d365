"""`fedmarket onboard`: the newcomer's first k % by time, the four options, resumable cells, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedmarket.config import config_from_dict
from fedmarket.data.prepare import prepare_data
from fedmarket.data.split import leave_one_out
from fedmarket.data.synthetic import make_synthetic_markets
from fedmarket.errors import ConfigError
from fedmarket.onboard import Plan, first_fraction, pays_until, run_plan, write_report


def test_first_fraction_keeps_the_earliest_train_rows_and_the_whole_evaluation() -> None:
    market = make_synthetic_markets(1, [60], 80, (8, 14), seed=3)
    split = leave_one_out(next(iter(market.values())), num_candidates=20, split_seed=1)
    part = first_fraction(split, 25)
    ts = split.market.timestamps
    assert len(part.train_index) == int(np.ceil(len(split.train_index) * 0.25))
    assert set(part.train_index) <= set(split.train_index)
    assert ts[part.train_index].max() <= np.sort(ts[split.train_index])[len(part.train_index) - 1]
    assert part.valid is split.valid and part.test is split.test and part.catalog is split.catalog
    users, items = split.market.users[part.train_index], split.market.items[part.train_index]
    for u in np.unique(users)[:5]:  # what the model may know of a user: its kept rows only
        seen = part.train_seen.indices[part.train_seen.indptr[u] : part.train_seen.indptr[u + 1]]
        assert set(seen) == set(items[users == u])
    assert first_fraction(split, 100) is split
    with pytest.raises(ConfigError, match=r"\(0, 100\]"):
        first_fraction(split, 0)


def _cfg(method: str = "fedavg"):
    return config_from_dict(
        {
            "name": "t",
            "dataset": {
                "name": "synthetic",
                "options": {"num_markets": 3, "users_per_market": 40, "items_per_market": 50},
            },
            "method": {"name": method},
            "model": {"name": "deepfm", "embed_dim": 8, "hidden": [16]},
            "train": {"batch_size": 64},
            "eval": {"candidates": 20},
            "progress": False,
        }
    )


def test_a_study_runs_every_option_resumes_and_reports(tmp_path) -> None:
    plan = Plan(_cfg(), ["m2"], [50.0, 100.0], [0], rounds=2, join_round=2, out=tmp_path, alone_rounds=2)
    lines: list[str] = []
    report = run_plan(plan, echo=lines.append)
    assert report.exists() and (tmp_path / "onboard.png").stat().st_size > 0
    cells = sorted((tmp_path / "cells").glob("*.json"))
    assert [c.name for c in cells] == ["m2_seed0_k100.json", "m2_seed0_k50.json"]
    cell = json.loads(cells[1].read_text())
    assert set(cell["options"]) == {"local", "transfer", "late", "start"}
    assert all("auc" in o["test"] and not o["failures"] for o in cell["options"].values())
    assert cell["options"]["transfer"]["source"] in {"m0", "m1"}
    late = cell["options"]["late"]
    assert late["federated"]["selected_round"] >= 2  # it took part from its join round only
    assert late["selected_round"] >= 1 and late["up_bytes"] > 0  # then trained alone; its uploads counted
    assert cell["options"]["local"]["up_bytes"] == 0 and cell["options"]["start"]["up_bytes"] > 0
    full = json.loads(cells[0].read_text())
    assert cell["train_interactions"] < full["train_interactions"]
    assert "Newcomer `m2`" in report.read_text()
    assert cell["protocol_version"] == 2 and cell["data_fingerprint"]
    assert (
        set(cell["floors"]) == {"popularity", "popularity_recency"} and "auc" in cell["floors"]["popularity"]
    )
    assert (
        "popularity (no learning)" in report.read_text()
        and "above both no-learning floors" in report.read_text()
    )
    lines.clear()
    run_plan(plan, echo=lines.append)  # every cell is done: nothing runs again
    assert lines == [lines[0]] and lines[0].startswith("onboard: 0 cell(s)")
    # a cell from before the floors gets them added, nothing else re-runs
    del cell["floors"]
    cells[1].write_text(json.dumps(cell))
    run_plan(plan, echo=lambda _: None)
    assert "floors" in json.loads(cells[1].read_text())
    # cells measured under another protocol are not merged
    cell["protocol_version"] = 1
    cells[1].write_text(json.dumps(cell))
    with pytest.raises(ConfigError, match="different protocols or data"):
        write_report(tmp_path)


def test_bad_plans_are_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"unknown markets \['atlantis'\]"):
        run_plan(Plan(_cfg(), ["atlantis"], [50.0], [0], 1, 2, tmp_path))
    with pytest.raises(ConfigError, match="not of the FedAvg family"):
        run_plan(Plan(_cfg("fedmm"), ["m1"], [50.0], [0], 1, 2, tmp_path))


def test_where_joining_stops_paying() -> None:
    seeds = (0, 1, 2)
    local = {5: [0.60, 0.61, 0.62], 10: [0.70, 0.71, 0.72], 50: [0.80, 0.81, 0.82]}
    late = {5: [0.70, 0.72, 0.71], 10: [0.75, 0.77, 0.76], 50: [0.80, 0.82, 0.81]}
    curve = {
        "local": {k: dict(zip(seeds, v, strict=True)) for k, v in local.items()},
        "late": {k: dict(zip(seeds, v, strict=True)) for k, v in late.items()},
    }
    v = pays_until(curve, "auc")["late"]
    assert v["wins_at"] == [5, 10] and v["tie_at"] == [50]
    assert v["pays_up_to"] == 10 and v["stops_paying_at"] == 50


def test_a_multi_task_study_cuts_impressions_by_time(tmp_path) -> None:
    cfg = config_from_dict(
        {
            "name": "t",
            "dataset": {
                "name": "synthetic-mtl",
                "options": {"num_markets": 3, "users_per_market": 40, "items_per_market": 50},
            },
            "method": {"name": "mtl_fedavg"},
            "model": {"name": "mmoe", "embed_dim": 4, "hidden": [8], "tower_hidden": [4], "num_experts": 2},
            "train": {"batch_size": 256},
            "eval": {"select_metric": "mean_auc", "full_ranking": False},
            "progress": False,
        }
    )
    split = prepare_data(cfg).splits["m1"]
    part = first_fraction(split, 25)
    ts = split.market.timestamps
    assert len(part.train_index) == int(np.ceil(len(split.train_index) * 0.25))
    assert ts[part.train_index].max() <= np.sort(ts[split.train_index])[len(part.train_index) - 1]
    assert part.valid_index is split.valid_index and part.test_index is split.test_index
    plan = Plan(cfg, ["m1"], [25.0], [0], rounds=1, join_round=2, out=tmp_path, alone_rounds=2)
    run_plan(plan, echo=lambda _: None)
    cell = json.loads((tmp_path / "cells" / "m1_seed0_k25.json").read_text())
    assert cell["metric"] == "mean_auc" and cell["train_interactions"] == len(part.train_index)
    assert all("mean_auc" in o["test"] and not o["failures"] for o in cell["options"].values())
