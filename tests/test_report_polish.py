"""The combined report's difference-to-Local heatmap, plots that fit a screen without overlapping labels,
no "±" for one seed, and the refusal to compare runs on different data (fake run folders)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedmarket.errors import FedmarketError
from fedmarket.report import (
    MAX_FIGURE_WIDTH,
    MAX_PNG_WIDTH,
    _diff_heatmap,
    _grouped_bars,
    _overlaps,
    _spread_annotations,
    comparison_table,
    load_run,
    local_difference,
    write_report,
    write_run_report,
)

MARKETS = ("de", "jp", "in")
# per-seed offsets to the Local run: every seed better, every seed worse, both ways
OFFSETS = {"better": (0.02, 0.021, 0.019), "worse": (-0.02, -0.018, -0.022), "mixed": (0.01, -0.012, 0.003)}


def _run(
    root: Path,
    name: str,
    method: str,
    offsets=(0.0, 0.0, 0.0),
    markets=MARKETS,
    fingerprint: str = "f00d",
    dataset: str = "xmrec",
) -> Path:
    """A finished run folder: per-seed test auc = 0.7 + 0.01·market index + the seed's offset."""
    run_dir = root / name
    (run_dir / "seeds").mkdir(parents=True)
    seeds = list(range(len(offsets)))
    tests = {
        s: {m: {"auc": 0.7 + 0.01 * i + offsets[s], "logloss": 0.5} for i, m in enumerate(markets)}
        for s in seeds
    }
    for s in seeds:
        (run_dir / "seeds" / f"seed{s}.json").write_text(json.dumps({"seed": s, "test": tests[s]}))
    per_market = {
        m: {"auc": float(np.mean([tests[s][m]["auc"] for s in seeds])), "logloss": 0.5} for m in markets
    }
    std = 0.0 if len(seeds) == 1 else 0.004
    metrics = {
        "name": name,
        "label": name,
        "method": method,
        "dataset": dataset,
        "markets": list(markets),
        "data_fingerprint": fingerprint,
        "protocol_version": 2,
        "seeds": seeds,
        "per_market": per_market,
        "per_market_std": {m: {"auc": std, "logloss": std} for m in markets},
        "average": {"auc": float(np.mean([v["auc"] for v in per_market.values()])), "logloss": 0.5},
        "average_std": {"auc": std, "logloss": std},
        "communication": {
            m: {"up_bytes": 1000 if method != "local" else 0, "down_bytes": 0, "rounds": 10} for m in markets
        },
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def _png_width(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


@pytest.fixture
def with_local(tmp_path: Path) -> list[Path]:
    return [
        _run(tmp_path, "fedavg", "fedavg", OFFSETS["better"]),
        _run(tmp_path, "local", "local"),
        _run(tmp_path, "fedprox", "fedprox", OFFSETS["worse"]),
        _run(tmp_path, "fedper", "fedper", OFFSETS["mixed"]),
        _run(tmp_path, "two_seeds", "fedmm", OFFSETS["better"][:2]),
    ]


def test_difference_to_local_with_verdicts(with_local: list[Path]) -> None:
    runs = [load_run(d) for d in with_local]
    labels = [r["label"] for r in runs]
    diff, verdicts, reference = local_difference(runs, labels, "auc")
    assert reference == "local" and list(diff.index) == ["fedavg", "fedprox", "fedper", "two_seeds"]
    assert list(diff.columns) == [*MARKETS, "average"]
    assert diff.loc["fedavg", "de"] == pytest.approx(0.02)
    assert set(verdicts.loc["fedavg"]) == {"wins"} and set(verdicts.loc["fedprox"]) == {"loses"}
    assert set(verdicts.loc["fedper"]) == {"tie"} and set(verdicts.loc["two_seeds"]) == {"untested"}
    # lower is better: a higher logloss would lose; equal values tie
    assert local_difference(runs, labels, "logloss")[0].abs().to_numpy().max() == pytest.approx(0.0)


def test_report_has_the_heatmap_section(with_local: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    text = write_report(with_local, out, metrics=("auc",)).read_text()
    assert "## Difference to local per market (auc)" in text
    assert "![difference to local](auc_vs_local_heatmap.png)" in text
    section = text.split("## Difference to local")[1].split("\n## ")[0]
    assert "wins" in section and "loses" in section and "tie" in section and "untested" in section
    assert _png_width(out / "auc_vs_local_heatmap.png") <= MAX_PNG_WIDTH


def test_no_local_run_no_heatmap(tmp_path: Path) -> None:
    runs = [_run(tmp_path, "a", "fedavg"), _run(tmp_path, "b", "fedprox", OFFSETS["better"])]
    text = write_report(runs, tmp_path / "report", metrics=("auc",)).read_text()
    assert "Difference to" not in text and not (tmp_path / "report" / "auc_vs_local_heatmap.png").exists()


def test_many_runs_and_long_market_names_fit_a_screen(tmp_path: Path) -> None:
    markets = tuple(f"market-with-a-rather-long-name-{i:02d}" for i in range(14))
    runs = [_run(tmp_path, "local", "local", markets=markets)]
    runs += [
        _run(tmp_path, f"an_experiment_with_a_long_name_{i:02d}", "fedavg", OFFSETS["mixed"], markets=markets)
        for i in range(11)
    ]
    out = tmp_path / "report"
    write_report(runs, out, metrics=("auc",))
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"auc_per_market.png", "auc_vs_bytes.png", "auc_vs_local_heatmap.png"}
    widths = {p.name: _png_width(p) for p in pngs}
    assert max(widths.values()) <= MAX_PNG_WIDTH, widths


def _renderer(fig: Figure):
    return FigureCanvasAgg(fig).get_renderer()


def test_tick_labels_and_cell_texts_do_not_overlap(tmp_path: Path) -> None:
    markets = tuple(f"market-with-a-rather-long-name-{i:02d}" for i in range(24))
    runs = [_run(tmp_path, "local", "local", markets=markets)]
    runs += [_run(tmp_path, f"run{i}", "fedavg", OFFSETS["better"], markets=markets) for i in range(3)]
    loaded = [load_run(d) for d in runs]
    diff, verdicts, reference = local_difference(loaded, [r["label"] for r in loaded], "auc")
    fig = _diff_heatmap(diff, verdicts, "auc", reference)
    assert fig.get_figwidth() <= MAX_FIGURE_WIDTH
    ax = fig.axes[0]
    renderer = _renderer(fig)
    assert not _overlaps(ax.get_xticklabels(), renderer)
    assert not _overlaps(ax.get_yticklabels(), renderer)
    assert not _overlaps(ax.texts, renderer)
    shown = {t.get_text() for t in ax.get_xticklabels()}
    assert all(len(t) <= 18 for t in shown) and len(shown) == len(markets) + 1  # shortened, still distinct

    table = comparison_table(loaded, "auc")
    fig, ax = _grouped_bars(table)
    assert fig.get_figwidth() <= MAX_FIGURE_WIDTH
    assert not _overlaps(ax.get_xticklabels(), _renderer(fig))


def test_point_labels_at_the_same_place_are_spread() -> None:
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
    notes = [
        ax.annotate(f"run {i}", (1.0, 0.5), textcoords="offset points", xytext=(5, 5), fontsize="small")
        for i in range(4)
    ]
    assert _overlaps(notes, _renderer(fig))
    _spread_annotations(fig, notes)
    assert not _overlaps(notes, _renderer(fig))


def test_one_seed_tables_print_no_plus_minus(tmp_path: Path) -> None:
    runs = [_run(tmp_path, "local", "local", (0.0,)), _run(tmp_path, "fedavg", "fedavg", (0.01,))]
    assert "±" not in comparison_table(runs, "auc", formatted=True).to_string()
    tables = [
        line
        for line in write_report(runs, tmp_path / "report").read_text().splitlines()
        if line.startswith("|")
    ]
    assert tables and not any("±" in line for line in tables)
    run_report = write_run_report(runs[1]).read_text()
    assert "Test metrics of the one seed" in run_report
    assert not any("±" in line for line in run_report.splitlines() if line.startswith("|"))
    several = _run(tmp_path, "fedper", "fedper", OFFSETS["mixed"])
    assert (
        "±" in comparison_table([several], "auc", formatted=True).to_string()
    )  # several seeds: spread shown


def test_report_refuses_runs_on_different_data(tmp_path: Path) -> None:
    a = _run(tmp_path, "local", "local", fingerprint="aaaa")
    b = _run(tmp_path, "fedavg", "fedavg", fingerprint="bbbb")
    with pytest.raises(
        FedmarketError, match=r"fedavg ran on other data than a run before it .*cannot be compared"
    ):
        write_report([a, b], tmp_path / "report")
    assert not (tmp_path / "report" / "report.md").exists()
    c = _run(tmp_path, "fedprox", "fedprox", fingerprint="aaaa")
    assert write_report([a, c], tmp_path / "report2", metrics=("auc",)).is_file()
