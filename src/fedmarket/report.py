"""Turn run folders into a readable comparison: Markdown tables and PNG plots.

A run folder, as written by the runtime, holds ``metrics.json`` (mean and std over seeds per market and
averaged over markets, bytes sent each way, failures, notes) and ``rounds.csv`` (validation metrics per
seed, round and market). This module only reads those files, so a report can be rebuilt at any time from
finished runs, on a machine without the data.

Conventions in every report: values are mean ± std over seeds (as stored by the runtime); ``average`` is
the unweighted mean over markets; MB = 10^6 bytes; runs with ``private: false`` are marked with † because
they pool raw data across markets and are a reference for how much cross-market signal exists, not a
federated method to compare on equal terms.

Plots are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly, never through ``pyplot``,
so no global backend is switched and nothing needs a display.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from fedmarket.errors import FedmarketError
from fedmarket.eval.convergence import stop_slopes
from fedmarket.eval.metrics import lower_is_better

__all__ = [
    "NOT_PRIVATE_NOTE",
    "communication_table",
    "comparison_table",
    "load_rounds",
    "load_run",
    "write_report",
    "write_run_report",
]

NOT_PRIVATE_NOTE = "not private: pools raw data"
NOT_PRIVATE_MARK = "†"
AVERAGE = "average"
MB = 1e6
ROUNDS_ID_COLUMNS = ("seed", "round", "market", "split", "up_bytes", "down_bytes")
# Metrics plotted per round by default when a run reports them (all 18 ranking metrics would bury the
# ones people read); if a run has none of these, all of its metric columns are plotted.
DEFAULT_ROUND_PLOT_METRICS = ("auc", "logloss", "gauc", "ndcg@10", "hr@10", "full_ndcg@10", "full_hr@10")
# Every plot fits a screen: a figure is at most MAX_FIGURE_WIDTH inches wide, and a saved PNG at most
# MAX_PNG_WIDTH pixels (a legend beside the axes widens the saved area; the resolution drops instead).
MAX_FIGURE_WIDTH = 12.0
MAX_PNG_WIDTH = 1200
SAVE_DPI = 120
TICK_LABEL_CHARS = 18  # market and run names on plot axes (tables keep the whole name)
# the methods whose run is the "Local" reference of the difference heatmap, in order of preference
LOCAL_METHODS = ("local", "mtl_local", "seq_local_text", "seq_local_id")

RunLike = Mapping[str, Any] | str | Path


# ------------------------------------------------------------------------------------------------ loading


def _float(value: Any) -> float:
    """JSON has no NaN in its standard: the runtime may write null for a metric it could not compute."""
    if value is None:
        return float("nan")
    return float(value)


def _metric_dict(value: Any, where: str, path: Path) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise FedmarketError(f"{path}: {where!r} must be an object of metric -> number")
    try:
        return {str(k): _float(v) for k, v in value.items()}
    except (TypeError, ValueError) as err:
        raise FedmarketError(f"{path}: {where!r} holds a value that is not a number ({err})") from err


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Read ``run_dir/metrics.json`` and normalise it.

    Missing optional keys get empty defaults (``per_market_std``, ``average_std``, ``communication``,
    ``failures``, ``notes``); ``label`` falls back to ``name``; ``average`` is recomputed as the macro mean
    over markets if absent; ``private`` defaults to True (only runs that declare pooling are marked).
    The returned dict also holds ``run_dir`` (a Path).

    Raises:
        FedmarketError: the folder or ``metrics.json`` is missing, not JSON, or lacks ``per_market`` or
            both ``label`` and ``name``. The message names the path.
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FedmarketError(f"run folder {run_dir} has no metrics.json (is it a finished fedmarket run?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FedmarketError(f"{path}: cannot read it as JSON ({err})") from err
    if not isinstance(raw, dict):
        raise FedmarketError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if "per_market" not in raw:
        raise FedmarketError(f"{path}: missing key 'per_market'")
    label = raw.get("label") or raw.get("name")
    if not label:
        raise FedmarketError(f"{path}: needs a 'label' or a 'name'")

    run: dict[str, Any] = dict(raw)
    run["run_dir"] = run_dir
    run["label"] = str(label)
    run["name"] = str(raw.get("name") or label)
    run["private"] = bool(raw.get("private", True))
    run["seeds"] = list(raw.get("seeds") or [])
    per_market = raw["per_market"]
    if not isinstance(per_market, Mapping):
        raise FedmarketError(f"{path}: 'per_market' must be an object of market -> metrics")
    run["per_market"] = {str(m): _metric_dict(v, f"per_market.{m}", path) for m, v in per_market.items()}
    run["per_market_std"] = {
        str(m): _metric_dict(v, f"per_market_std.{m}", path)
        for m, v in (raw.get("per_market_std") or {}).items()
    }
    if raw.get("average") is None:
        from fedmarket.eval.metrics import average_over_markets

        run["average"] = average_over_markets(run["per_market"])
    else:
        run["average"] = _metric_dict(raw["average"], "average", path)
    run["average_std"] = _metric_dict(raw.get("average_std") or {}, "average_std", path)
    run["communication"] = dict(raw.get("communication") or {})
    run["failures"] = list(raw.get("failures") or [])
    run["notes"] = [str(n) for n in raw.get("notes") or []]
    run["protocol_version"] = int(raw.get("protocol_version") or 1)
    return run


def check_comparable(runs: Sequence[Mapping[str, Any]]) -> None:
    """Refuse to put runs side by side that ran under different evaluation protocols or on different data
    of the same dataset (their numbers do not measure the same thing)."""
    versions = {int(r.get("protocol_version") or 1) for r in runs}
    if len(versions) > 1:
        by = {
            v: [str(r["run_dir"]) for r in runs if int(r.get("protocol_version") or 1) == v] for v in versions
        }
        raise FedmarketError(f"runs of different evaluation protocol versions cannot be compared: {by}")
    prints: dict[tuple[str, str], str] = {}
    for r in runs:
        fp = r.get("data_fingerprint")
        if not fp:
            continue
        key = (str(r.get("dataset")), str(sorted(r.get("markets") or r["per_market"])))
        if key in prints and prints[key] != fp:
            raise FedmarketError(
                f"{r['run_dir']} ran on other data than a run before it (dataset {key[0]}, fingerprint "
                f"{fp} vs {prints[key]}); runs on different data cannot be compared"
            )
        prints.setdefault(key, fp)


def load_rounds(run_dir: str | Path) -> pd.DataFrame | None:
    """``run_dir/rounds.csv`` as a DataFrame, or None when the run did not write one."""
    path = Path(run_dir) / "rounds.csv"
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise FedmarketError(f"{path}: cannot read it as CSV ({err})") from err


def _as_runs(runs: Iterable[RunLike]) -> list[dict[str, Any]]:
    return [dict(r) if isinstance(r, Mapping) else load_run(r) for r in runs]


# ------------------------------------------------------------------------------------------------- tables


def _row_labels(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Run labels, made unique (two runs of one method differ by name) and marked when not private."""
    original = [str(r["label"]) for r in runs]
    labels = [
        f"{label} ({run.get('name', i)})" if original.count(label) > 1 else label
        for i, (label, run) in enumerate(zip(original, runs, strict=True))
    ]
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} #{seen[label]}"
    return [
        f"{label} {NOT_PRIVATE_MARK}" if not run.get("private", True) else label
        for label, run in zip(labels, runs, strict=True)
    ]


def _markets(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Union of markets over runs, in first-seen order (the runtime's order is meaningful, e.g. by size)."""
    return list(dict.fromkeys(m for r in runs for m in r["per_market"]))


def _mean_std_frames(runs: Sequence[Mapping[str, Any]], metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    labels = _row_labels(runs)
    columns = [*_markets(runs), AVERAGE]
    mean = pd.DataFrame(np.nan, index=pd.Index(labels, name="run"), columns=columns, dtype=float)
    std = mean.copy()
    for label, run in zip(labels, runs, strict=True):
        for market, values in run["per_market"].items():
            mean.loc[label, market] = values.get(metric, np.nan)
            std.loc[label, market] = run["per_market_std"].get(market, {}).get(metric, np.nan)
        mean.loc[label, AVERAGE] = run["average"].get(metric, np.nan)
        std.loc[label, AVERAGE] = run["average_std"].get(metric, np.nan)
        if len(run.get("seeds") or []) == 1:  # one seed: no spread is known, so none is printed
            std.loc[label, :] = np.nan
    return mean, std


def _format_mean_std(mean: float, std: float, digits: int) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    if std is None or math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def comparison_table(
    runs: Iterable[RunLike], metric: str = "auc", formatted: bool = False, digits: int = 4
) -> pd.DataFrame:
    """One row per run (its label), one column per market plus ``average``.

    Args:
        runs: dicts from :func:`load_run`, or run folders.
        formatted: False gives float means (NaN where a run lacks the market or metric), for analysis;
            True gives strings ``"0.7612 ± 0.0031"`` (``"–"`` when missing), for Markdown.
    """
    runs = _as_runs(runs)
    mean, std = _mean_std_frames(runs, metric)
    if not formatted:
        return mean
    cells = [
        [_format_mean_std(mean.iat[i, j], std.iat[i, j], digits) for j in range(mean.shape[1])]
        for i in range(mean.shape[0])
    ]
    return pd.DataFrame(cells, index=mean.index, columns=mean.columns)


def communication_table(runs: Iterable[RunLike]) -> pd.DataFrame:
    """Bytes each market sent and received, as totals (MB) and per round (MB/round), one row per
    (run, market). Runs whose ``metrics.json`` has no communication section contribute no rows."""
    runs = _as_runs(runs)
    rows = []
    for label, run in zip(_row_labels(runs), runs, strict=True):
        for market, comm in run["communication"].items():
            up, down = _float(comm.get("up_bytes", 0)), _float(comm.get("down_bytes", 0))
            rounds = int(comm.get("rounds", 0) or 0)
            rows.append(
                {
                    "run": label,
                    "market": market,
                    "rounds": rounds,
                    "up MB": up / MB,
                    "down MB": down / MB,
                    "up MB/round": up / MB / rounds if rounds else 0.0,
                    "down MB/round": down / MB / rounds if rounds else 0.0,
                }
            )
    return pd.DataFrame(
        rows, columns=["run", "market", "rounds", "up MB", "down MB", "up MB/round", "down MB/round"]
    )


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return re.sub(r"\s+", " ", str(value)).replace("|", "\\|")


def markdown_table(df: pd.DataFrame, index: bool = True) -> str:
    """A plain GitHub-flavoured Markdown table (pandas' to_markdown needs the optional tabulate)."""
    header = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    for key, row in df.iterrows():
        cells = ([_cell(key)] if index else []) + [_cell(v) for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- plots


def _file_stem(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9@._-]+", "_", metric)


def _save(fig: Figure, path: Path) -> Path:
    """Save at `SAVE_DPI`, or lower when the drawn area (legend beside the axes included) would be wider
    than `MAX_PNG_WIDTH` pixels."""
    canvas = FigureCanvasAgg(fig)
    width = fig.get_tightbbox(canvas.get_renderer()).width + 0.2  # inches; savefig pads 0.1 each side
    dpi = min(SAVE_DPI, math.floor(MAX_PNG_WIDTH / width))
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def _short(text: Any, limit: int = TICK_LABEL_CHARS) -> str:
    """A name for a plot axis: at most ``limit`` characters, the middle elided (``ml1m-p…no-towers``), since
    names of one family differ at the end as often as at the start."""
    text = str(text)
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[-(limit - 1 - head) :]


def _overlaps(texts: Sequence[Any], renderer: Any) -> bool:
    """Whether any two of the drawn texts' boxes overlap (by more than a pixel)."""
    boxes = [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1:
                return True
    return False


def _fit_tick_labels(fig: Figure, ax: Any) -> None:
    """No two x tick labels overlap: upright first, then turned vertical, then smaller (down to 5 pt)."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    labels = ax.get_xticklabels()
    if not _overlaps(labels, renderer):
        return
    for label in labels:
        label.set_rotation(90)
        label.set_horizontalalignment("center")
    size = labels[0].get_fontsize() if labels else 10.0
    while _overlaps(labels, renderer) and size > 5:
        size = max(5.0, size - 1)
        for label in labels:
            label.set_fontsize(size)


def _value_limits(low: np.ndarray, high: np.ndarray) -> tuple[float, float] | None:
    """A y range around the data: metric differences between methods are often in the third decimal,
    invisible on an axis starting at 0."""
    finite_low, finite_high = low[np.isfinite(low)], high[np.isfinite(high)]
    if len(finite_low) == 0 or len(finite_high) == 0:
        return None
    lo, hi = float(finite_low.min()), float(finite_high.max())
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.05
    bottom = lo - 0.15 * span
    if lo >= 0 > bottom:
        bottom = 0.0
    return bottom, hi + 0.15 * span


def _grouped_bars(
    values: pd.DataFrame, errors: pd.DataFrame | None = None, ticks: Sequence[str] | None = None
) -> tuple[Figure, Any]:
    """One group of bars per column of ``values`` (markets), one bar per row (run), legend on the right."""
    groups = list(values.columns)
    n_runs = len(values.index)
    # wide enough to tell the bars apart, capped so a many-run comparison stays a readable page width
    fig_width = 1.1 * len(groups) * max(1, n_runs) * 0.45 + 2
    fig = Figure(figsize=(min(MAX_FIGURE_WIDTH, max(6.0, fig_width)), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(groups))
    width = 0.8 / max(1, n_runs)
    # more runs than the default cycle's 10 colours: 20 distinct ones, so no two runs share a colour
    colors = matplotlib.colormaps["tab20"].colors if n_runs > 10 else [None] * n_runs
    for i, label in enumerate(values.index):
        err = None
        if errors is not None:
            err = np.nan_to_num(errors.loc[label].to_numpy(dtype=float), nan=0.0)
        ax.bar(
            x - 0.4 + width * (i + 0.5),
            values.loc[label].to_numpy(dtype=float),
            width,
            yerr=err,
            capsize=2 if err is not None else 0,
            label=label,
            color=colors[i % len(colors)],
        )
    ticks = list(ticks) if ticks is not None else groups
    ax.set_xticks(x, [_short(t) for t in ticks])
    _fit_tick_labels(fig, ax)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig, ax


def _plot_per_market(mean: pd.DataFrame, std: pd.DataFrame, metric: str, path: Path) -> Path:
    fig, ax = _grouped_bars(mean, std)
    values, errors = mean.to_numpy(dtype=float), np.nan_to_num(std.to_numpy(dtype=float), nan=0.0)
    limits = _value_limits(values - errors, values + errors)
    if limits:
        ax.set_ylim(*limits)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per market (mean ± std over seeds)")
    return _save(fig, path)


def _upload_per_market_round(run: Mapping[str, Any]) -> float | None:
    """Mean over markets of bytes uploaded per round; None when the run recorded no communication."""
    comm = run["communication"]
    if not comm:
        return None
    per_market = []
    for values in comm.values():
        rounds = int(values.get("rounds", 0) or 0)
        up = _float(values.get("up_bytes", 0))
        per_market.append(up / rounds if rounds else 0.0)
    return float(np.mean(per_market))


def _human_bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:g} {unit}"
    return f"{value:g} B"


def _plot_vs_bytes(runs: Sequence[Mapping[str, Any]], labels: Sequence[str], metric: str, path: Path) -> Path:
    """Average metric against upload cost. A log axis cannot show 0 (Local sends nothing), so zero-byte
    runs sit on a dotted line at a tenth of the smallest non-zero upload, labelled "0 bytes"."""
    points = []
    for label, run in zip(labels, runs, strict=True):
        up = _upload_per_market_round(run)
        value = run["average"].get(metric, np.nan)
        if up is None or math.isnan(value):
            continue
        points.append((label, up, value, run["average_std"].get(metric, np.nan)))
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
    positive = [p[1] for p in points if p[1] > 0]
    zero_at = min(positive) / 10.0 if positive else 1.0
    notes = []
    for label, up, value, std in points:
        x = up if up > 0 else zero_at
        ax.errorbar([x], [value], yerr=[0.0 if math.isnan(std) else std], fmt="o", capsize=3, label=label)
        notes.append(
            ax.annotate(label, (x, value), textcoords="offset points", xytext=(5, 5), fontsize="small")
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: _human_bytes(value)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if points:
        xs = [p[1] if p[1] > 0 else zero_at for p in points]
        ax.set_xlim(min(xs) / 3.0, max(xs) * 3.0)
    if any(p[1] == 0 for p in points):
        ax.axvline(zero_at, color="grey", linestyle=":", linewidth=1)
        ax.text(zero_at, 0.02, " 0 bytes", transform=ax.get_xaxis_transform(), color="grey", fontsize="small")
    if not points:
        ax.text(0.5, 0.5, f"no run reports {metric} with communication", ha="center", transform=ax.transAxes)
    ax.set_xlabel("bytes uploaded per market per round (mean over markets, log scale)")
    ax.set_ylabel(f"average {metric}")
    ax.set_title(f"average {metric} vs upload cost")
    ax.grid(alpha=0.3, which="both")
    _spread_annotations(fig, notes)
    return _save(fig, path)


def _spread_annotations(fig: Figure, notes: Sequence[Any]) -> None:
    """Move point labels that would overlap (runs of equal cost and close scores) apart vertically, each
    below the one it collides with, so every label stays readable next to its point."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    for _ in range(len(notes) * len(notes)):
        boxes = [n.get_window_extent(renderer) for n in notes]
        clash = next(
            (
                (i, j)
                for i in range(len(notes))
                for j in range(i + 1, len(notes))
                if min(boxes[i].x1, boxes[j].x1) - max(boxes[i].x0, boxes[j].x0) > 1
                and min(boxes[i].y1, boxes[j].y1) - max(boxes[i].y0, boxes[j].y0) > 1
            ),
            None,
        )
        if clash is None:
            return
        i, j = clash
        lower = j if boxes[j].y0 <= boxes[i].y0 else i
        other = i if lower == j else j
        shift = (boxes[lower].y1 - boxes[other].y0 + 2) * 72 / fig.dpi  # pixels → points
        x_off, y_off = notes[lower].xyann
        notes[lower].xyann = (x_off, y_off - shift)


def _rounds_metric_columns(rounds: pd.DataFrame) -> list[str]:
    return [
        c for c in rounds.columns if c not in ROUNDS_ID_COLUMNS and pd.api.types.is_numeric_dtype(rounds[c])
    ]


def _plot_per_round(rounds: pd.DataFrame, metric: str, path: Path) -> Path:
    """Validation metric per round, one line per market (mean over seeds, band = ± std over seeds),
    and the macro average over markets as a dashed black line."""
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
    several_seeds = "seed" in rounds and rounds["seed"].nunique() > 1
    by = rounds.groupby(["market", "round"], sort=True)[metric]
    stats = by.mean().to_frame("mean").join(by.std(ddof=1).fillna(0.0).to_frame("std")).reset_index()
    for market in rounds["market"].unique():  # the runtime's market order, not alphabetical
        part = stats[stats["market"] == market]
        (line,) = ax.plot(part["round"], part["mean"], marker=".", label=str(market))
        if several_seeds:
            low, high = part["mean"] - part["std"], part["mean"] + part["std"]
            ax.fill_between(part["round"], low, high, color=line.get_color(), alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    average = stats.groupby("round")["mean"].mean()
    ax.plot(average.index, average.to_numpy(), color="black", linestyle="--", linewidth=2, label=AVERAGE)
    ax.set_xlabel("round")
    ax.set_ylabel(f"valid {metric}")
    ax.set_title(f"valid {metric} per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ reports


def _runs_overview(runs: Sequence[Mapping[str, Any]], labels: Sequence[str], base: Path) -> pd.DataFrame:
    rows = []
    stops = any(r.get("convergence") for r in runs)
    for label, run in zip(labels, runs, strict=True):
        # relative to the report, so the table stays valid when results are moved together
        folder = (
            os.path.relpath(Path(run["run_dir"]).resolve(), base.resolve()) if run.get("run_dir") else "–"
        )
        rows.append(
            {
                "run": label,
                "method": run.get("method") or "–",
                "dataset": run.get("dataset") or "–",
                "model": run.get("model") or "–",
                "seeds": ", ".join(str(s) for s in run.get("seeds", [])) or "–",
                "private": "yes" if run.get("private", True) else "no",
                "rounds": _rounds_run(run),
                **({"slope at stop": _stop_slope(run) if run.get("convergence") else "–"} if stops else {}),
                "folder": folder,
            }
        )
    return pd.DataFrame(rows).set_index("run")


def _rounds_run(run: Mapping[str, Any]) -> str:
    """Rounds trained per seed: with early stopping (``train.patience``) the rounds each seed ran and, for
    phased methods, where the first phase ended ("24 (ft from 21)"); otherwise the configured rounds."""
    conv = run.get("convergence") or {}
    if conv:
        parts = []
        for seed in sorted(conv, key=lambda s: int(s) if str(s).isdigit() else str(s)):
            c = conv[seed]
            text = str(c.get("rounds_run", "–"))
            if c.get("phase_ends"):
                text += f" (phase 2 from {c['phase_ends'][0] + 1})"
            if c.get("converged_round") is None:
                text += "*"  # hit the round limit before the plateau
            parts.append(text)
        return ", ".join(parts)
    rounds = ((run.get("config") or {}).get("train") or {}).get("rounds")
    return str(rounds) if rounds is not None else "–"


def _stop_slope(run: Mapping[str, Any]) -> str:
    """The validation score's slope per round just before each seed's final early stop (×10⁻³, see
    `fedmarket.eval.convergence.stop_slopes`): near 0 at a plateau; clearly positive when patience fired on noise."""
    metric = ((run.get("config") or {}).get("eval") or {}).get("select_metric")
    if not metric or not run.get("run_dir"):
        return "–"
    final = [r for r in stop_slopes(run["run_dir"], metric) if r["kind"] == "converged"]
    slopes = [1000 * r["slope"] for r in final if np.isfinite(r["slope"])]
    return ", ".join(f"{v:+.2f}" for v in slopes) or "–"


def _shorten(text: str, limit: int = 200) -> str:
    """One line, at most ``limit`` characters: a traceback belongs in the run's log, not in a table."""
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failures_section(runs: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[str]:
    rows = [
        {
            "run": label,
            "seed": f.get("seed", "–"),
            "round": f.get("round", "–"),
            "market": f.get("market", "–"),
            "error": _shorten(str(f.get("error", ""))),
        }
        for label, run in zip(labels, runs, strict=True)
        for f in run["failures"]
    ]
    if not rows:
        return []
    return ["## Failures", "", markdown_table(pd.DataFrame(rows), index=False), ""]


def _notes_section(runs: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[str]:
    notes = [
        f"- **{label}**: {note}" for label, run in zip(labels, runs, strict=True) for note in run["notes"]
    ]
    return ["## Notes", "", *notes, ""] if notes else []


def _communication_section(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    table = communication_table(runs)
    if table.empty:
        return []
    return [
        "## Communication",
        "",
        "Bytes each market uploaded to and downloaded from the server, as recorded by the runtime; "
        "MB = 10^6 bytes.",
        "",
        markdown_table(table, index=False),
        "",
    ]


def _private_note(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    if all(r.get("private", True) for r in runs):
        return []
    return [
        f"{NOT_PRIVATE_MARK} {NOT_PRIVATE_NOTE} (a reference for how much cross-market signal the data "
        "holds, not a federated method compared on equal terms).",
        "",
    ]


# one-to-one transfer methods and the local run they are measured against
TRANSFER_REFERENCE = {"seq_transfer": "seq_local_text", "seq_transfer_id": "seq_local_id"}


def transfer_source(run: Mapping[str, Any]) -> str | None:
    """The source market of a one-to-one transfer run: the only market that uploaded anything (it pre-trains
    alone and sends its model to the targets). None for other methods or when that is ambiguous."""
    if run.get("method") not in TRANSFER_REFERENCE:
        return None
    uploaders = [m for m, c in (run.get("communication") or {}).items() if c.get("up_bytes", 0) > 0]
    return uploaders[0] if len(uploaders) == 1 else None


def gain_over_local(
    runs: Sequence[Mapping[str, Any]], labels: Sequence[str], metric: str
) -> tuple[pd.DataFrame, str, str | None] | None:
    """Per-market gain of every private run over the local reference of the first transfer run
    (``TRANSFER_REFERENCE``): markets × runs, the reference's label and the source market. A negative
    gain in a target market is negative transfer; the transfer's gain in its source market against the
    other methods' gains there shows what the source gets (nothing, or less) from one-to-one transfer.
    None when no transfer run, no matching local run, or no ``metric``."""
    transfer = next((r for r in runs if r.get("method") in TRANSFER_REFERENCE), None)
    if transfer is None:
        return None
    ref_i = next(
        (i for i, r in enumerate(runs) if r.get("method") == TRANSFER_REFERENCE[transfer["method"]]), None
    )
    if ref_i is None:
        return None
    ref = runs[ref_i]
    columns = {}
    for label, run in zip(labels, runs, strict=True):
        if run is ref or not run.get("private", True) or run.get("dataset") != ref.get("dataset"):
            continue
        columns[label] = {
            m: run["per_market"].get(m, {}).get(metric, np.nan) - v.get(metric, np.nan)
            for m, v in ref["per_market"].items()
        }
    gains = pd.DataFrame(columns)
    if gains.empty or gains.isna().all().all():
        return None
    return gains, labels[ref_i], transfer_source(transfer)


def _first_metric(metrics: Sequence[str], make: Callable[[str], Any]) -> tuple[str, Any] | None:
    """The first of ``metrics`` for which ``make(metric)`` is not None, with what it made (a section's
    headline metric: the first one the runs report)."""
    for metric in metrics:
        made = make(metric)
        if made is not None:
            return metric, made
    return None


def _transfer_section(
    runs: Sequence[Mapping[str, Any]], labels: Sequence[str], metrics: Sequence[str], out_dir: Path
) -> list[str]:
    found = _first_metric(metrics, lambda m: gain_over_local(runs, labels, m))
    if found is None:
        return []
    metric, (gains, ref_label, source) = found
    stem = _file_stem(metric)
    names = [f"{m} (source)" if m == source else m for m in gains.index]
    fig, ax = _grouped_bars(gains.T, ticks=names)
    ax.axhline(0, color="black", linewidth=0.8)
    if source in gains.index:
        at = list(gains.index).index(source)
        ax.axvspan(at - 0.45, at + 0.45, color="#fdd", zorder=0)
    ax.set_ylabel(f"{metric} − {ref_label}")
    ax.set_title(
        f"Gain over {ref_label} per market (below 0: negative transfer; shaded: the transfer's source)"
    )
    _save(fig, out_dir / f"{stem}_gain_over_local.png")
    table = pd.DataFrame(
        {
            "markets below local": (gains < 0).sum(),
            "mean gain (all markets)": gains.mean(),
            "gain in the source market" if source else "gain (no source)": gains.loc[source]
            if source in gains.index
            else np.nan,
        }
    )
    table.index.name = "run"
    lines = [
        f"## Transfer: gain over {ref_label} ({metric})",
        "",
        f"Per market, each private run's test {metric} minus {ref_label}'s. Below 0 in a target market is "
        f"negative transfer; one-to-one transfer's source market is `{source}` (the only market it uploads "
        "from), where the other rows show what collaboration gives the source and transfer does not.",
        "",
        markdown_table(table),
        "",
        f"![gain over local]({stem}_gain_over_local.png)",
        "",
    ]
    return lines


def _seed_values(run: Mapping[str, Any], metric: str) -> dict[str, dict[int, float]]:
    """A loaded run's per-seed test values of ``metric`` (``{market or "average": {seed: value}}``), read
    from its ``seeds/`` records once and cached in the run dict."""
    from fedmarket.eval.verdicts import per_seed_metric

    cache = run.setdefault("_per_seed", {}) if isinstance(run, dict) else {}
    if metric not in cache:
        folder = run.get("run_dir")
        cache[metric] = per_seed_metric(folder, metric) if folder is not None else {}
    return cache[metric]


def verdict_table(
    runs: Sequence[Mapping[str, Any]], labels: Sequence[str], metric: str, reference: str
) -> pd.DataFrame:
    """Per run (rows) and market (+ average): the paired difference to the run labelled ``reference`` over
    the seeds both ran, its 95 % interval and the verdict (`fedmarket.eval.verdicts.paired_verdict`)."""
    from fedmarket.eval.verdicts import format_verdict, paired_verdict

    by_label = dict(zip(labels, runs, strict=True))
    if reference not in by_label:
        raise FedmarketError(f"no run labelled {reference!r} among {list(labels)}")
    ref = _seed_values(by_label[reference], metric)
    rows = {}
    for label, run in by_label.items():
        if label == reference:
            continue
        mine = _seed_values(run, metric)
        rows[label] = {
            m: format_verdict(paired_verdict(mine.get(m, {}), ref.get(m, {}), metric))
            for m in [*_markets(runs), AVERAGE]
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = f"{metric}: run − {reference}"
    return table


def local_reference(runs: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> str | None:
    """The label of the "Local" run (each market alone: the floor a collaboration must beat): the first run
    of the first of `LOCAL_METHODS` present; None when no run is one."""
    for method in LOCAL_METHODS:
        for label, run in zip(labels, runs, strict=True):
            if run.get("method") == method:
                return label
    return None


def local_difference(
    runs: Sequence[Mapping[str, Any]], labels: Sequence[str], metric: str
) -> tuple[pd.DataFrame, pd.DataFrame, str] | None:
    """Every other run's mean test ``metric`` minus the Local run's (`local_reference`), per market and on
    the average (runs × markets), the paired verdicts of the same cells (`fedmarket.eval.verdicts`: wins,
    tie, loses, untested; "–" where a run lacks the market) and the Local run's label. None without a Local
    run, without another run, or when no cell has a value."""
    from fedmarket.eval.verdicts import paired_verdict

    reference = local_reference(runs, labels)
    if reference is None or len(runs) < 2:
        return None
    mean, _ = _mean_std_frames(runs, metric)
    mean.index = list(labels)
    others = [label for label in labels if label != reference]
    diff = mean.loc[others] - mean.loc[reference]
    if diff.isna().all().all():
        return None
    by_label = dict(zip(labels, runs, strict=True))
    ref_values = _seed_values(by_label[reference], metric)
    verdicts = pd.DataFrame("–", index=diff.index, columns=diff.columns, dtype=object)
    for label in others:
        mine = _seed_values(by_label[label], metric)
        for market in diff.columns:
            if not math.isnan(diff.loc[label, market]):
                verdicts.loc[label, market] = paired_verdict(
                    mine.get(market, {}), ref_values.get(market, {}), metric
                )["verdict"]
    return diff, verdicts, reference


def _diff_heatmap(diff: pd.DataFrame, verdicts: pd.DataFrame, metric: str, reference: str) -> Figure:
    """Runs × markets coloured by the difference to the Local run (green = better, whichever direction the
    metric improves in; pale where the verdict is not ``wins`` or ``loses``, so a tie never looks like a
    result), the difference and the verdict printed in each cell; grey where a run has no value. The figure
    stays within `MAX_FIGURE_WIDTH`: many markets make the cells narrower, then their text smaller, and in
    the end only the verdict's first letter is printed."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n_rows, n_cols = diff.shape
    width = min(MAX_FIGURE_WIDTH, 3.0 + 0.95 * n_cols)
    fig = Figure(figsize=(width, 1.6 + 0.5 * n_rows))
    ax = fig.add_subplot()
    values = diff.to_numpy(dtype=float)
    better = -values if lower_is_better(metric) else values
    limit = float(np.nanmax(np.abs(better))) if np.isfinite(better).any() else 0.0
    norm, cmap = Normalize(-(limit or 1e-9), limit or 1e-9), matplotlib.colormaps["RdYlGn"]
    colors = cmap(norm(np.nan_to_num(better)))
    decided = verdicts.isin(["wins", "loses"]).to_numpy()
    colors[~decided, :3] = 0.45 * colors[~decided, :3] + 0.55  # blended with white
    colors[np.isnan(values)] = matplotlib.colors.to_rgba("#d9d9d9")
    ax.imshow(colors, aspect="auto")
    ax.set_xticks(range(n_cols), [_short(c) for c in diff.columns])
    ax.set_yticks(range(n_rows), [_short(r, 2 * TICK_LABEL_CHARS) for r in diff.index])
    if AVERAGE in diff.columns and n_cols > 1:
        ax.axvline(list(diff.columns).index(AVERAGE) - 0.5, color="black", linewidth=1.5)
    texts = []
    for i in range(n_rows):
        for j in range(n_cols):
            if math.isnan(values[i, j]):
                continue
            strong = decided[i, j] and abs(better[i, j]) > 0.7 * limit
            texts.append(
                ax.text(
                    j,
                    i,
                    f"{values[i, j]:+.4f}\n{verdicts.iat[i, j]}",
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white" if strong else "black",
                )
            )
    fig.colorbar(ScalarMappable(norm, cmap), ax=ax, fraction=0.04, pad=0.02).set_label(
        f"{metric} − {_short(reference, 2 * TICK_LABEL_CHARS)}"
        + (" (sign flipped: up is better)" if lower_is_better(metric) else "")
    )
    ax.set_title(f"{metric}: difference to {_short(reference, 2 * TICK_LABEL_CHARS)} per market")
    _fit_tick_labels(fig, ax)
    fig.tight_layout()
    _fit_cell_texts(fig, ax, texts, n_rows, n_cols)
    return fig


def _fit_cell_texts(fig: Figure, ax: Any, texts: Sequence[Any], n_rows: int, n_cols: int) -> None:
    """Shrink the cells' texts until each fits its cell (with a margin, so neighbours never touch); below
    5 pt print only the verdict's first letter (W, T, L, U)."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    bbox = ax.get_window_extent(renderer)
    cell_w = bbox.width / max(1, n_cols) - 4
    cell_h = bbox.height / max(1, n_rows) - 2

    def fits() -> bool:
        boxes = [t.get_window_extent(renderer) for t in texts]
        return all(b.width <= cell_w and b.height <= cell_h for b in boxes)

    size = 9.0
    while texts and not fits() and size > 5:
        size -= 0.5
        for t in texts:
            t.set_fontsize(size)
    if texts and not fits():
        for t in texts:
            t.set_text(t.get_text().split("\n")[-1][:1].upper())
            t.set_fontsize(max(4.0, min(9.0, cell_w * 72 / fig.dpi / 0.8)))
        ax.set_xlabel("W wins · T tie · L loses · U untested", fontsize="small")


def _local_section(
    runs: Sequence[Mapping[str, Any]], labels: Sequence[str], metrics: Sequence[str], out_dir: Path
) -> list[str]:
    found = _first_metric(metrics, lambda m: local_difference(runs, labels, m))
    if found is None:
        return []
    metric, (diff, verdicts, reference) = found
    stem = _file_stem(metric)
    _save(_diff_heatmap(diff, verdicts, metric, reference), out_dir / f"{stem}_vs_local_heatmap.png")
    return [
        f"## Difference to {reference} per market ({metric})",
        "",
        f"Each run's mean test {metric} minus {reference}'s (each market alone), per market and on the average; "
        f"green is better than {reference}, red worse. The verdict in each cell is the paired one over the seeds "
        "both ran (`wins`/`loses` only when the 95 % interval excludes 0, else `tie`; `untested` with fewer "
        "than 3 paired seeds). The table gives the intervals.",
        "",
        f"![difference to {reference}]({stem}_vs_local_heatmap.png)",
        "",
        markdown_table(verdict_table(runs, labels, metric, reference)),
        "",
    ]


def winners_table(
    runs: Sequence[Mapping[str, Any]], labels: Sequence[str], metric: str
) -> pd.DataFrame | None:
    """Per market (and the average): the private run with the best mean test ``metric``, the runner-up, the
    margin between them, the paired verdict of best against runner-up over the seeds both ran
    (`fedmarket.eval.verdicts`: "wins" only when the 95 % interval excludes 0, else "tie"; "untested" with
    fewer than 3 paired seeds) and the winner's upload per market per round. Runs that are not private
    (pooled data) are ceilings, not contenders. None when fewer than two private runs report ``metric``."""
    from fedmarket.eval.verdicts import format_verdict, paired_verdict

    private = {label: run for label, run in zip(labels, runs, strict=True) if run.get("private", True)}
    if len(private) < 2:
        return None
    mean, std = _mean_std_frames(list(private.values()), metric)
    mean.index = std.index = list(private)
    lower = lower_is_better(metric)
    rows = {}
    for market in mean.columns:
        col = mean[market].dropna().sort_values(ascending=lower)
        if len(col) < 2:
            continue
        best, second = col.index[0], col.index[1]
        margin = abs(col[best] - col[second])
        v = paired_verdict(
            _seed_values(private[best], metric).get(market, {}),
            _seed_values(private[second], metric).get(market, {}),
            metric,
        )
        upload = _upload_per_market_round(private[best])
        rows[market] = {
            "best": best,
            metric: col[best],
            "runner-up": second,
            "margin": margin,
            "paired verdict": v["verdict"] if v["n"] else "untested",
            "best − runner-up [95% CI]": format_verdict(v),
            "best uploads per round": _human_bytes(float(f"{upload:.3g}")) if upload else "nothing",
        }
    if not rows:
        return None
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "market"
    return table


def _winners_section(
    runs: Sequence[Mapping[str, Any]], labels: Sequence[str], metrics: Sequence[str]
) -> list[str]:
    found = _first_metric(metrics, lambda m: winners_table(runs, labels, m))
    if found is None:
        return []
    metric, table = found
    markets = table.drop(index=AVERAGE, errors="ignore")
    clear = markets[markets["paired verdict"] == "wins"]
    counts = clear["best"].value_counts()
    tally = ", ".join(f"{label} {n}" for label, n in counts.items()) or "none"
    return [
        f"## Which run wins where ({metric})",
        "",
        f"Per market, the private run with the best mean test {metric} "
        f"({'lower' if lower_is_better(metric) else 'higher'} is better), the runner-up, and the paired "
        "verdict of the two over the seeds both ran: a paired t-test over seeds gives a 95 % interval of the "
        "difference; `wins` only when it excludes 0, else `tie`; `untested` with fewer than 3 paired seeds "
        f"(then no run wins). Markets won: {tally}.",
        "",
        markdown_table(table),
        "",
    ]


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    metrics: Sequence[str] = ("auc", "logloss", "gauc", "ndcg@10"),
    title: str = "fedmarket comparison",
) -> Path:
    """Compare several runs in ``out_dir/report.md`` plus ``<metric>_per_market.png`` (bars per market
    and run, std error bars) and ``<metric>_vs_bytes.png`` (average metric vs upload per market per
    round) for every metric at least one run reports. Returns the path of ``report.md``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise FedmarketError("write_report needs at least one run folder")
    check_comparable(runs)
    labels = _row_labels(runs)
    # the compared run folders, relative to the report (`fedmarket export COMPARISON --market M` picks the
    # market's winner among them)
    (out_dir / "runs.json").write_text(
        json.dumps(
            {
                "runs": [os.path.relpath(Path(d).resolve(), out_dir.resolve()) for d in run_dirs],
                "labels": labels,
            },
            indent=1,
        )
    )

    lines = [f"# {title}", ""]
    lines += [
        f"{len(runs)} runs. Values are mean ± std over seeds; `{AVERAGE}` is the unweighted mean over "
        "markets; – means the run has no value there.",
        "",
    ]
    datasets = sorted({str(r.get("dataset")) for r in runs if r.get("dataset")})
    if len(datasets) > 1:
        lines += [f"Note: these runs come from different datasets ({', '.join(datasets)}).", ""]
    lines += ["## Runs", "", markdown_table(_runs_overview(runs, labels, out_dir)), ""]
    if any(r.get("convergence") for r in runs):
        lines += [
            "`rounds`: rounds each seed trained, stopped by `train.patience` "
            '(`*`: stopped by the round limit first; "phase 2 from N": e.g. local fine-tuning after FedAvg). '
            "`slope at stop`: per seed, the validation score's slope (×10⁻³ per round) over the last rounds "
            "before the stop; clearly above 0 means it was still rising (a longer `train.patience` would "
            "have trained on).",
            "",
        ]
    lines += _private_note(runs)
    lines += _winners_section(runs, labels, metrics)
    lines += _local_section(runs, labels, metrics, out_dir)

    missing = []
    for metric in metrics:
        mean, std = _mean_std_frames(runs, metric)
        if mean.isna().all().all():
            missing.append(metric)
            continue
        stem = _file_stem(metric)
        _plot_per_market(mean, std, metric, out_dir / f"{stem}_per_market.png")
        _plot_vs_bytes(runs, labels, metric, out_dir / f"{stem}_vs_bytes.png")
        lines += [f"## {metric}", "", markdown_table(comparison_table(runs, metric, formatted=True)), ""]
        lines += [f"![{metric} per market]({stem}_per_market.png)", ""]
        lines += [f"![{metric} vs bytes uploaded]({stem}_vs_bytes.png)", ""]
    if missing:
        lines += [f"No run reports: {', '.join(missing)}.", ""]
    lines += _transfer_section(runs, labels, metrics, out_dir)

    lines += _communication_section(runs)
    lines += _failures_section(runs, labels)
    lines += _notes_section(runs, labels)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def write_run_report(
    run_dir: str | Path, out_dir: str | Path | None = None, metrics: Sequence[str] | None = None
) -> Path:
    """Report of one run: ``report.md`` (markets × metrics table, communication, failures, notes) and a
    ``<metric>_per_round.png`` validation curve per metric from ``rounds.csv``. Written into ``run_dir``
    unless ``out_dir`` is given; returns the path of ``report.md``.

    Args:
        metrics: metrics to tabulate and plot; default every metric in the run's ``average`` for the
            table, and for the curves those of ``DEFAULT_ROUND_PLOT_METRICS`` present in ``rounds.csv``
            (all metric columns if none is).
    """
    run = load_run(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = _row_labels([run])[0]
    table_metrics = list(metrics) if metrics is not None else list(run["average"])

    one_seed = len(run["seeds"]) == 1  # no spread is known: the stored std of 0 is not printed
    rows = {}
    for market in [*run["per_market"], AVERAGE]:
        mean = run["average"] if market == AVERAGE else run["per_market"][market]
        std = run["average_std"] if market == AVERAGE else run["per_market_std"].get(market, {})
        std = {} if one_seed else std
        rows[market] = [_format_mean_std(mean.get(m, np.nan), std.get(m, np.nan), 4) for m in table_metrics]
    table = pd.DataFrame.from_dict(rows, orient="index", columns=table_metrics)
    table.index.name = "market"

    lines = [f"# {label}", ""]
    info = [f"{k}: {run.get(k)}" for k in ("method", "dataset", "model") if run.get(k)]
    info.append("seeds: " + (", ".join(str(s) for s in run["seeds"]) or "–"))
    lines += [" · ".join(info), ""]
    lines += _private_note([run])
    lines += [
        ("Test metrics of the one seed" if one_seed else "Test metrics, mean ± std over seeds")
        + f"; `{AVERAGE}` is the unweighted mean over markets.",
        "",
        markdown_table(table),
        "",
    ]

    rounds = load_rounds(run_dir)
    if rounds is not None and not rounds.empty:
        if "split" in rounds:
            rounds = rounds[rounds["split"] == "valid"]
        available = _rounds_metric_columns(rounds)
        if metrics is not None:
            plot_metrics = [m for m in metrics if m in available]
        else:
            plot_metrics = [m for m in DEFAULT_ROUND_PLOT_METRICS if m in available] or available
        for metric in plot_metrics:
            stem = _file_stem(metric)
            _plot_per_round(rounds, metric, out_dir / f"{stem}_per_round.png")
            lines += [f"![valid {metric} per round]({stem}_per_round.png)", ""]

    lines += _evaluation_section(run)
    lines += _communication_section([run])
    lines += _upload_audit_section(Path(run_dir), run)
    lines += _privacy_section(run)
    lines += _failures_section([run], [label])
    lines += _notes_section([run], [label])
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path


def _evaluation_section(run: Mapping[str, Any]) -> list[str]:
    """What the evaluation protocol evaluated per market (``metrics.json`` → ``evaluation``)."""
    evaluation = run.get("evaluation") or {}
    if not evaluation:
        return []
    impressions = any("evaluated_impressions" in v for v in evaluation.values())
    if impressions:  # multi-task scenarios: impressions, not users with one held-out positive
        columns = {
            "evaluated_impressions": "test impressions in the main metrics",
            "cold_test_impressions": "cold test impressions (cold-item report)",
            "cold_test_positives": "of them clicked",
            "catalog_items": "catalog items",
            "items": "items",
        }
        intro = (
            "Main metrics: test impressions of items with a train impression in the scenario; impressions of "
            "items without one are in the `cold_*` metrics (docs/protocol.md)."
        )
    else:
        columns = {
            "evaluated_users": "users in the main metrics",
            "cold_test_positives": "cold test positives (cold-item report)",
            "catalog_items": "catalog items",
            "items": "items",
            "collapsed_repeats": "repeated rows collapsed",
        }
        intro = (
            "Main metrics: held-out positives with a train interaction against negatives from the catalog "
            "(items with a train interaction); held-out positives without one are in the `cold_*` metrics "
            "(docs/protocol.md)."
        )
    frame = pd.DataFrame(evaluation).T.reindex(columns=list(columns)).rename(columns=columns)
    frame.index.name = "market"
    version = run.get("protocol_version", 1)
    return [
        f"## What was evaluated (protocol {version})",
        "",
        intro,
        "",
        markdown_table(frame),
        "",
    ]


def _upload_audit_section(run_dir: Path, run: dict) -> list[str]:
    """What left each market: the declared patterns, then per market the distinct key sets it uploaded
    (with shapes), in how many rounds, and the bytes per upload, from ``uploads.csv``."""
    declaration = run.get("upload_declaration") or {}
    lines = ["## What left each market (upload audit)", ""]
    patterns = declaration.get("patterns")
    if patterns is not None:
        shown = ", ".join(f"`{p}`" for p in patterns) or "nothing"
        lines += [f"Declared: {shown}. {declaration.get('reason', '')}".rstrip(), ""]
    if declaration.get("metrics"):
        keys = ", ".join(f"`{p}`" for p in declaration["metrics"])
        lines += [
            f"Metrics that may leave each market (scalars per market and round; nothing per user): {keys}. "
            "Metrics travel in the clear, also with secure aggregation.",
            "",
        ]
    path = run_dir / "uploads.csv"
    if not path.exists():
        return [*lines, "No upload log in this run folder.", ""]
    uploads = pd.read_csv(path)
    if uploads.empty:
        return [*lines, "Nothing left any market: no upload was made.", ""]
    rows = []
    for (market, keys), group in uploads.groupby(["market", "keys"], sort=False):
        shapes = json.loads(keys)
        listed = ", ".join(f"{k} {tuple(v)}" for k, v in list(shapes.items())[:6])
        if len(shapes) > 6:
            listed += f", … ({len(shapes)} arrays)"
        rows.append(
            {
                "market": market,
                "uploads": len(group),
                "bytes/upload": int(group["bytes"].median()),
                "arrays (shape)": listed.replace("|", "\\|"),
            }
        )
    return [*lines, markdown_table(pd.DataFrame(rows).set_index("market")), ""]


def _privacy_section(run: dict) -> list[str]:
    """Differential privacy (ε per round), secure aggregation and whether the server step is a sum, from
    ``metrics.json["privacy"]`` (written by `fedmarket.federation.privacy` / `secagg` and the api)."""
    record = run.get("privacy") or {}
    lines = ["## Privacy guarantees", ""]
    if "epsilon" in record:
        stop = record.get("stopped_before_round")
        lines += [
            f"Differential privacy ({record['mode']} noise): clip norm C = {record['clip_norm']:g} "
            f"({record.get('clipping', 'flat')}), noise multiplier σ = {record['noise_multiplier']:g}, "
            f"δ = {record['delta']:g}; **ε = {record['epsilon']:.3f}** after the last round. "
            f"{record.get('guarantee', '')}. Accountant: {record.get('accountant', 'RDP')}.",
            "",
        ]
        if record.get("sampling"):
            lines += [f"Participation: {record['sampling']}.", ""]
        if record.get("covers"):
            lines += [f"ε covers {record['covers']}.", ""]
        if record.get("target_epsilon") is not None:
            lines += [
                f"Target ε = {record['target_epsilon']:g}: "
                + (f"training stopped before round {stop}." if stop else "not reached."),
                "",
            ]
        rows = record.get("rounds") or []
        if rows:
            table = pd.DataFrame(rows).set_index("round")
            lines += [markdown_table(table.rename(columns={"markets": "markets uploading"})), ""]
    else:
        lines += ["No differential privacy in this run (`privacy.mode: off`).", ""]
    secure = record.get("secure_aggregation")
    if secure:
        lines += [
            f"Secure aggregation ({secure.get('protocol') or 'pairwise masks, simulated in process'}"
            + (f", {secure['fraction_bits']} fraction bits" if "fraction_bits" in secure else "")
            + "): "
            f"the server saw only masked uploads and their sum in rounds {secure['secured_rounds'] or 'none'}."
        ]
        if secure.get("clear_rounds"):
            lines[-1] += (
                f" Rounds {secure['clear_rounds']} were aggregated in the clear: "
                + "; ".join(secure.get("clear_reasons", []))
                + "."
            )
        lines += [""]
    step = record.get("server_step")
    if step:
        lines += [f"Server step of `{step['strategy']}`:", ""]
        for kind in step["kinds"]:
            rounds = kind["rounds"]
            span = f"rounds {rounds[0]}–{rounds[-1]}" if len(rounds) > 1 else f"round {rounds[0]}"
            verdict = (
                "a weighted sum (secure aggregation can hide each upload)"
                if kind["sum"]
                else ("**not a sum**: secure aggregation cannot hide individual uploads")
            )
            lines += [f"- {span}: {verdict} — {kind['reason']}"]
        lines += [""]
    return lines
