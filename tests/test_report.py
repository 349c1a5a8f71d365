"""Reports from fake run folders: tables, communication, failures, PNGs, errors naming the folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from fedmarket.errors import FedmarketError
from fedmarket.report import (
    NOT_PRIVATE_NOTE,
    communication_table,
    comparison_table,
    load_run,
    winners_table,
    write_report,
    write_run_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MARKETS = ("de", "jp", "in")


def _fake_run(
    root: Path, name: str, label: str, base: float, up_bytes: int, private: bool = True, failures=()
) -> Path:
    run_dir = root / name
    run_dir.mkdir()
    per_market = {
        m: {"auc": base + 0.01 * i, "logloss": 0.5 - 0.01 * i, "gauc": base - 0.05, "ndcg@10": 0.3 + 0.01 * i}
        for i, m in enumerate(MARKETS)
    }
    per_market_std = {m: {"auc": 0.0031, "logloss": 0.002, "gauc": 0.004, "ndcg@10": 0.01} for m in MARKETS}
    metrics = {
        "name": name,
        "method": label.split("-")[0],
        "dataset": "xmrec",
        "model": "deepfm",
        "private": private,
        "label": label,
        "seeds": [0, 1, 2],
        "per_market": per_market,
        "per_market_std": per_market_std,
        "average": {"auc": base + 0.01, "logloss": 0.49, "gauc": base - 0.05, "ndcg@10": 0.31},
        "average_std": {"auc": 0.002, "logloss": 0.001, "gauc": 0.003, "ndcg@10": 0.005},
        "communication": {
            m: {"up_bytes": up_bytes, "down_bytes": 2 * up_bytes, "rounds": 10} for m in MARKETS
        },
        "failures": list(failures),
        "notes": [f"{label} note"],
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "seeds").mkdir()
    for seed in (0, 1, 2):  # per-seed test records: the paired verdicts read them
        test = {
            m: {k: v + (0.0005 * seed if k == "auc" else 0.0) for k, v in pm.items()}
            for m, pm in per_market.items()
        }
        (run_dir / "seeds" / f"seed{seed}.json").write_text(json.dumps({"seed": seed, "test": test}))
    rows = [
        {
            "seed": seed,
            "round": r,
            "market": m,
            "split": "valid",
            "auc": base + 0.001 * r + 0.0005 * seed,
            "logloss": 0.6 - 0.01 * r,
            "up_bytes": up_bytes // 10,
            "down_bytes": up_bytes // 5,
        }
        for seed in (0, 1)
        for r in range(1, 4)
        for m in MARKETS
    ]
    pd.DataFrame(rows).to_csv(run_dir / "rounds.csv", index=False)
    return run_dir


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), path


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    local = _fake_run(tmp_path, "local_run", "local-deepfm", 0.7612, up_bytes=0)
    fedavg = _fake_run(
        tmp_path,
        "fedavg_run",
        "fedavg-deepfm",
        0.7650,
        up_bytes=3_000_000,
        failures=[{"seed": 1, "round": 4, "market": "jp", "error": "NaN | in payload\nline two"}],
    )
    central = _fake_run(tmp_path, "central_run", "central-deepfm", 0.7750, up_bytes=5_000_000, private=False)
    return [local, fedavg, central]


def test_write_report_tables_and_plots(two_runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    path = write_report(two_runs, out, title="XMRec CTR")
    text = path.read_text()
    assert path == out / "report.md"
    assert text.startswith("# XMRec CTR")
    for label in ("local-deepfm", "fedavg-deepfm", "central-deepfm †"):
        assert label in text
    for market in MARKETS:
        assert f"| {market} |" in text  # communication table rows
    assert "| run | de | jp | in | average |" in text
    assert "0.7612 ± 0.0031" in text  # local, market de
    assert "0.7750 ± 0.0031" in text  # central, market de
    assert "0.7712 ± 0.0020" in text  # local average
    assert NOT_PRIVATE_NOTE in text
    assert "NaN \\| in payload line two" in text  # failure row: one line, pipe escaped
    assert "fedavg-deepfm note" in text
    assert "0.3" in text and "| 10 |" in text  # fedavg: 3 MB total, 0.3 MB/round, 10 rounds
    for metric in ("auc", "logloss", "gauc", "ndcg@10"):
        assert f"## {metric}" in text
        _assert_png(out / f"{metric}_per_market.png")
        _assert_png(out / f"{metric}_vs_bytes.png")
        assert f"]({metric}_per_market.png)" in text


def test_metric_no_run_reports_is_listed_not_plotted(two_runs: list[Path], tmp_path: Path) -> None:
    text = write_report(two_runs[:1], tmp_path / "r", metrics=("auc", "hr@10")).read_text()
    assert "No run reports: hr@10." in text
    assert not (tmp_path / "r" / "hr@10_per_market.png").exists()


def test_comparison_table_numeric_and_formatted(two_runs: list[Path]) -> None:
    runs = [load_run(d) for d in two_runs]
    numeric = comparison_table(runs, "auc")
    assert list(numeric.columns) == [*MARKETS, "average"]
    assert numeric.loc["fedavg-deepfm", "jp"] == pytest.approx(0.7750)
    formatted = comparison_table(two_runs, "auc", formatted=True)  # run folders work too
    assert formatted.loc["local-deepfm", "de"] == "0.7612 ± 0.0031"
    assert math.isnan(comparison_table(runs, "missing_metric").loc["local-deepfm", "de"])


def test_duplicate_labels_are_disambiguated(tmp_path: Path) -> None:
    a = _fake_run(tmp_path, "run_a", "fedavg-deepfm", 0.76, up_bytes=10)
    b = _fake_run(tmp_path, "run_b", "fedavg-deepfm", 0.77, up_bytes=10)
    table = comparison_table([a, b], "auc")
    assert list(table.index) == ["fedavg-deepfm (run_a)", "fedavg-deepfm (run_b)"]


def test_communication_table_per_round(two_runs: list[Path]) -> None:
    table = communication_table(two_runs)
    row = table[(table["run"] == "fedavg-deepfm") & (table["market"] == "de")].iloc[0]
    assert row["up MB"] == pytest.approx(3.0) and row["down MB/round"] == pytest.approx(0.6)


def test_write_run_report(two_runs: list[Path]) -> None:
    path = write_run_report(two_runs[1])
    text = path.read_text()
    assert path == two_runs[1] / "report.md"
    assert "# fedavg-deepfm" in text and "| market | auc | logloss | gauc | ndcg@10 |" in text
    assert "0.7650 ± 0.0031" in text
    for metric in ("auc", "logloss"):
        _assert_png(two_runs[1] / f"{metric}_per_round.png")
    assert not (two_runs[1] / "up_bytes_per_round.png").exists()


def test_missing_metrics_json_names_the_folder(tmp_path: Path) -> None:
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(FedmarketError, match="not_a_run"):
        load_run(empty)
    with pytest.raises(FedmarketError, match="not_a_run"):
        write_report([empty], tmp_path / "out")


def test_invalid_metrics_json_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad_run"
    bad.mkdir()
    (bad / "metrics.json").write_text("{not json")
    with pytest.raises(FedmarketError, match="bad_run.*metrics.json"):
        load_run(bad)
    (bad / "metrics.json").write_text(json.dumps({"label": "x"}))
    with pytest.raises(FedmarketError, match="per_market"):
        load_run(bad)


def test_runs_table_shows_rounds_run_and_convergence() -> None:
    from fedmarket.report import _rounds_run

    assert _rounds_run({"config": {"train": {"rounds": 12}}}) == "12"
    conv = {
        "0": {"rounds_run": 24, "converged_round": 24, "phase_ends": [20]},
        "1": {"rounds_run": 40, "converged_round": None, "phase_ends": []},
    }
    assert _rounds_run({"convergence": conv}) == "24 (phase 2 from 21), 40*"


def test_runs_table_shows_the_slope_at_the_stop(tmp_path: Path) -> None:
    """A run stopped by patience while its validation still rose shows a clearly positive slope; a run
    without early stopping shows none."""
    from fedmarket.report import _runs_overview, load_run

    def run(name: str, conv: dict | None, step: float) -> dict:
        run_dir = tmp_path / name
        (run_dir / "seeds").mkdir(parents=True)
        history = [{"round": r, "market": "a", "split": "valid", "auc": 0.6 + step * r} for r in range(1, 31)]
        seed = {"seed": 0, "test": {}, "history": history, "convergence": conv or {}}
        (run_dir / "seeds" / "seed0.json").write_text(json.dumps(seed))
        metrics = {
            "name": name,
            "per_market": {"a": {"auc": 0.7}},
            "config": {"eval": {"select_metric": "auc"}, "train": {"rounds": 30}},
            "seeds": [0],
            **({"convergence": {"0": conv}} if conv else {}),
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        return load_run(run_dir)

    conv = {"rounds_run": 30, "converged_round": 30, "phase_ends": []}
    runs = [run("rising", conv, 0.002), run("fixed", None, 0.002)]
    table = _runs_overview(runs, ["rising", "fixed"], tmp_path)
    assert table.loc["rising", "slope at stop"] == "+2.00"
    assert table.loc["fixed", "slope at stop"] == "–"
    assert "slope at stop" not in _runs_overview(runs[1:], ["fixed"], tmp_path).columns


def test_transfer_gain_over_local_shows_negative_transfer_and_the_source(tmp_path: Path) -> None:
    from fedmarket.report import gain_over_local, transfer_source

    def seq_run(name: str, method: str, ndcg: dict, up: dict) -> Path:
        run_dir = tmp_path / name
        run_dir.mkdir()
        metrics = {
            "name": name,
            "label": name,
            "method": method,
            "dataset": "movielens-age",
            "seeds": [0],
            "per_market": {m: {"full_ndcg@10": v} for m, v in ndcg.items()},
            "communication": {m: {"up_bytes": b, "down_bytes": 0, "rounds": 5} for m, b in up.items()},
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        return run_dir

    none = {"a": 0, "b": 0, "c": 0}
    local = seq_run("local_text", "seq_local_text", {"a": 0.05, "b": 0.02, "c": 0.03}, none)
    transfer = seq_run(
        "transfer", "seq_transfer", {"a": 0.05, "b": 0.03, "c": 0.01}, {"a": 800, "b": 0, "c": 0}
    )
    fecosr = seq_run("fecosr", "fecosr", {"a": 0.06, "b": 0.04, "c": 0.04}, {"a": 9, "b": 9, "c": 9})
    runs = [load_run(d) for d in (local, transfer, fecosr)]
    assert transfer_source(runs[1]) == "a" and transfer_source(runs[2]) is None
    gains, ref, source = gain_over_local(runs, ["local_text", "transfer", "fecosr"], "full_ndcg@10")
    assert ref == "local_text" and source == "a"
    assert gains.loc["c", "transfer"] == pytest.approx(-0.02)  # negative transfer in target c
    assert gains.loc["a", "transfer"] == pytest.approx(0.0)  # the source gains nothing
    assert gains.loc["a", "fecosr"] == pytest.approx(0.01)
    assert list(gains.columns) == ["transfer", "fecosr"]
    text = write_report([local, transfer, fecosr], tmp_path / "out", metrics=("full_ndcg@10",)).read_text()
    assert "## Transfer: gain over local_text (full_ndcg@10)" in text and "`a`" in text
    _assert_png(tmp_path / "out" / "full_ndcg@10_gain_over_local.png")
    # without a local reference (or a transfer run) there is no such section
    assert gain_over_local(runs[1:], ["transfer", "fecosr"], "full_ndcg@10") is None
    plain = write_report([local, fecosr], tmp_path / "plain", metrics=("full_ndcg@10",)).read_text()
    assert "gain over" not in plain


def test_winners_per_market_leave_out_pooled_runs_and_screen_the_margin(
    two_runs: list[Path], tmp_path
) -> None:
    runs = [load_run(d) for d in two_runs]
    labels = [r["label"] + (" †" if not r["private"] else "") for r in runs]
    table = winners_table(runs, labels, "auc")
    # central (0.7750, not private) is a ceiling, not a winner: fedavg beats local by 0.0038 > std 0.0031
    assert list(table.index) == [*MARKETS, "average"]
    assert set(table["best"]) == {"fedavg-deepfm"} and set(table["runner-up"]) == {"local-deepfm"}
    assert table.loc["de", "margin"] == pytest.approx(0.0038)
    # the same +0.0038 on every paired seed: the interval excludes 0
    assert set(table["paired verdict"]) == {"wins"}
    assert table.loc["de", "best uploads per round"] == "300 kB"
    # equal log loss everywhere: a zero difference is a tie
    assert set(winners_table(runs, labels, "logloss")["paired verdict"]) == {"tie"}
    # lower log loss is better; one seed gives no interval: untested, never a win
    low = _fake_run(tmp_path, "low_run", "fedprox-deepfm", 0.70, up_bytes=0)
    metrics = json.loads((low / "metrics.json").read_text())
    metrics["per_market"]["jp"]["logloss"] = 0.1
    metrics["seeds"] = [0]
    (low / "metrics.json").write_text(json.dumps(metrics))
    for seed in (1, 2):
        (low / "seeds" / f"seed{seed}.json").unlink()
    rec = json.loads((low / "seeds" / "seed0.json").read_text())
    rec["test"]["jp"]["logloss"] = 0.1
    (low / "seeds" / "seed0.json").write_text(json.dumps(rec))
    runs.append(load_run(low))
    table = winners_table(runs, [*labels, "fedprox-deepfm"], "logloss")
    assert table.loc["jp", "best"] == "fedprox-deepfm" and table.loc["jp", "paired verdict"] == "untested"
    assert "1 seed: untested" in table.loc["jp", "best − runner-up [95% CI]"]
    assert table.loc["jp", "best uploads per round"] == "nothing"
    text = write_report([*two_runs, low], tmp_path / "rep").read_text()
    assert "## Which run wins where (auc)" in text and "Markets won: fedavg-deepfm 3" in text
    assert winners_table(runs[:1], labels[:1], "auc") is None  # one run: nothing to compare
