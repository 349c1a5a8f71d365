"""``fedmarket export``: a run's selected model of each market as a self-contained folder.

Why self-contained: a serving host should need neither the run folder (checkpoints get deleted, runs get
merged) nor the training data nor fedmarket's trainers, and must not unpickle anything. One folder per
market, ``OUT/<market>/``:

- ``model.safetensors``: the weights (the model's ``state_dict``) of the selected round;
- ``features.safetensors``: the tables the model reads, in the market's own index order (CTR ``user_x`` /
  ``item_x`` with FedMM's codes in them; a sequential model's item text vectors and item map), plus the
  train history (CSR ``history_indptr`` / ``history_items``, time order), ``catalog`` (items with a train
  interaction: what may be recommended) and ``popularity`` (train interactions per item, the fallback);
- ``spec.json``: family (ctr | seq), model name, options, field sizes, market, seed, selected round;
- ``users.csv`` / ``items.csv``: raw keys ↔ indices (row ``index`` of every table);
- ``config.yaml``: the run's config; ``card.json`` + ``card.md``: the model card (`fedmarket.serving.card`);
- ``manifest.json``: the SHA-256 of every file, checked on load.

The ID maps and history come from the data the run was trained on, loaded again with the run's config;
its fingerprint must equal the run's (``metrics.json`` → ``data_fingerprint``), so an export never pairs a
model with other data. Each market folder is assembled under ``<market>.partial`` and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedmarket.serving.models import ExportError, build_model, read_model_file, sha256_of

EXPORT_FORMAT = "fedmarket-export-1"
MANIFEST = "manifest.json"


def _run_files(run_dir: Path) -> tuple[dict[str, Any], Any]:
    from fedmarket.config import load_run_config

    if not run_dir.is_dir():
        raise ExportError(f"run folder {run_dir} does not exist")
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise ExportError(f"{run_dir} is not a finished run: {metrics_file.name} is missing")
    return json.loads(metrics_file.read_text()), load_run_config(run_dir)


def models_index(run_dir: Path, seed: int) -> dict[str, Any]:
    """``models/seed<N>/index.json`` of a run, or one error saying why the run has none."""
    index_file = run_dir / "models" / f"seed{seed}" / "index.json"
    if index_file.is_file():
        return json.loads(index_file.read_text())
    if (run_dir / "flower").is_dir():
        raise ExportError(
            f"{run_dir} ran on Flower, whose runtime does not save selected models yet: not exportable yet "
            "(train it in process with fedmarket run)"
        )
    raise ExportError(
        f"{run_dir} has no saved models for seed {seed} ({index_file} is missing: trained before models were "
        "saved, or a merged/restored folder)"
    )


def history_csr(
    users: np.ndarray, items: np.ndarray, times: np.ndarray, num_users: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's train items in time order (file order breaks ties) as CSR (indptr [U+1], items)."""
    order = np.lexsort((np.arange(len(users)), times, users))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=num_users))]).astype(np.int64)
    return indptr, items[order].astype(np.int64)


def export_run(
    run_dir: str | Path,
    out: str | Path,
    markets: list[str] | None = None,
    seed: int | None = None,
    data_dir: str | None = None,
) -> list[Path]:
    """Export ``markets`` (default: every exported market) of ``seed`` (default: the run's first) into
    ``out/<market>/``; returns the folders. Every input is checked before anything is written."""
    from fedmarket.data.prepare import prepare_data
    from fedmarket.serving.card import build_card, card_markdown

    run_dir, out = Path(run_dir), Path(out)
    metrics, cfg = _run_files(run_dir)
    seeds = [int(s) for s in metrics.get("seeds") or cfg.seeds]
    if seed is None:
        seed = seeds[0]
    elif seed not in seeds:
        raise ExportError(f"--seed {seed}: {run_dir} ran seeds {seeds}")
    index = models_index(run_dir, seed)
    available = dict(index.get("markets") or {})
    refused = dict(index.get("not_exported") or {})
    if markets is None:
        if not available:
            reasons = "; ".join(f"{m}: {r}" for m, r in refused.items()) or "no market"
            raise ExportError(f"{run_dir} seed {seed} has no exportable model ({reasons})")
        markets = list(available)
    for m in markets:
        if m in refused:
            raise ExportError(f"market {m!r} of {run_dir} seed {seed} is not exportable: {refused[m]}")
        if m not in available:
            raise ExportError(
                f"market {m!r} is not in {run_dir} (its markets: {sorted(available) + sorted(refused)})"
            )
    targets = {m: out / m for m in markets}
    for target in targets.values():
        if target.exists():
            raise ExportError(f"export target {target} already exists; choose a new --out")

    models = {}
    for m in markets:
        path = run_dir / "models" / f"seed{seed}" / available[m]["file"]
        export, meta = read_model_file(path)
        build_model(export, str(path))  # the weights load into their spec, or nothing is written
        models[m] = (export, meta)

    splits: dict[str, Any] = {}
    if any(export.family != "mtl" for export, _ in models.values()):  # multi-task hooks carry their keys
        if data_dir is not None:
            cfg.dataset.data_dir = data_dir
        data = prepare_data(cfg)
        expected = metrics.get("data_fingerprint")
        if expected and data.fingerprint != expected:
            raise ExportError(
                f"the data loaded for {run_dir} (fingerprint {data.fingerprint}) is not the data it was trained "
                f"on ({expected}); point --data-dir at that data"
            )
        splits = data.splits
        missing = [m for m, (export, _) in models.items() if export.family != "mtl" and m not in splits]
        if missing:
            raise ExportError(f"markets {missing} are missing from the data of {run_dir}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for m in markets:
        export, meta = models[m]
        split = splits.get(m)
        card = build_card(metrics, cfg, m, seed, meta, run_dir)
        written.append(_write_market(targets[m], export, meta, split, cfg, card, card_markdown(card)))
    return written


def _check_tables(export, split, where: str) -> None:
    market = split.market
    rows = {"user_x": market.num_users, "item_x": market.num_items, "item_map": market.num_items}
    for name, n in rows.items():
        table = export.tables.get(name)
        if table is not None and len(table) != n:
            raise ExportError(f"{where}: table {name} has {len(table)} rows, market {split.name!r} has {n}")


SERVING_TABLES = ("history_indptr", "history_items", "catalog", "popularity")


def serving_tables(export, split) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """User keys, item keys (the row order of every table) and the train history, catalog and popularity:
    from the market's split, or from the export itself (multi-task hooks, whose keys are ``id_*`` codes)."""
    if split is None:
        t = {k: v.numpy() for k, v in export.tables.items()}
        users = [str(k) for k in t["user_keys"].tolist()]
        return users, [str(k) for k in t["item_keys"].tolist()], {k: t[k] for k in SERVING_TABLES}
    market = split.market
    _check_tables(export, split, f"model of market {split.name!r}")
    indptr, hist = history_csr(split.train_users, split.train_items, split.train_timestamps, market.num_users)
    extra = {
        "history_indptr": indptr,
        "history_items": hist,
        "catalog": np.asarray(split.catalog_mask, dtype=bool),
        "popularity": np.bincount(split.train_items, minlength=market.num_items).astype(np.int64),
    }
    return [str(u) for u in market.user_ids], [str(i) for i in market.item_ids], extra


def _write_market(target: Path, export, meta: dict[str, Any], split, cfg, card: dict, card_md: str) -> Path:
    import yaml
    from safetensors.torch import save_file

    user_keys, item_keys, extra = serving_tables(export, split)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(
            {k: v.detach().clone().contiguous() for k, v in export.weights.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": EXPORT_FORMAT},
        )
        tables = {k: v.detach().clone().contiguous() for k, v in export.tables.items()}
        tables.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in extra.items()})
        for key in ("user_keys", "item_keys"):  # in users.csv / items.csv
            tables.pop(key, None)
        save_file(tables, str(tmp / "features.safetensors"), metadata={"format": EXPORT_FORMAT})
        catalog, popularity = np.asarray(extra["catalog"], dtype=bool), extra["popularity"]
        pd.DataFrame({"index": np.arange(len(user_keys)), "user": user_keys}).to_csv(
            tmp / "users.csv", index=False
        )
        pd.DataFrame(
            {
                "index": np.arange(len(item_keys)),
                "item": item_keys,
                "in_catalog": catalog.astype(int),
                "train_interactions": popularity,
            }
        ).to_csv(tmp / "items.csv", index=False)
        spec = {
            "format": EXPORT_FORMAT,
            "family": export.family,
            "market": meta.get("market"),
            "seed": meta.get("seed"),
            "selected_round": meta.get("selected_round"),
            "method": cfg.method.name,
            "dataset": cfg.dataset.name,
            "users": len(user_keys),
            "items": len(item_keys),
            "catalog_items": int(catalog.sum()),
            **export.spec,
        }
        (tmp / "spec.json").write_text(json.dumps(spec, indent=2))
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (tmp / "card.json").write_text(json.dumps(card, indent=2, default=str))
        (tmp / "card.md").write_text(card_md)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"format": EXPORT_FORMAT, "files": {name: sha256_of(tmp / name) for name in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def comparison_runs(sources: list[str | Path]) -> list[Path]:
    """The run folders ``sources`` name: run folders themselves, or comparison folders (a report written by
    ``fedmarket compare|demo|report``, whose ``runs.json`` lists the runs it compared)."""
    out: list[Path] = []
    for src in map(Path, sources):
        listing = src / "runs.json"
        if listing.is_file():
            out += [(src / rel).resolve() for rel in json.loads(listing.read_text())["runs"]]
        elif (src / "metrics.json").is_file():
            out.append(src)
        else:
            raise ExportError(f"{src} is neither a finished run (metrics.json) nor a comparison (runs.json)")
    return out


def pick_winner(run_dirs: list[Path], market: str, metric: str | None = None) -> tuple[Path, str]:
    """The run to export for ``market``: among the private runs that saved a model for it, the best mean test
    ``metric`` (default: the first run's ``eval.select_metric``, the metric rounds are selected on). Returns
    the run folder and one sentence naming it, the runner-up and their paired verdict (`fedmarket.eval.
    verdicts`), and, when the best private run overall has no model to export (a no-learning floor), that."""
    from fedmarket.eval.metrics import lower_is_better
    from fedmarket.eval.verdicts import format_verdict, paired_verdict
    from fedmarket.report import _seed_values, load_run

    if not run_dirs:
        raise ExportError("no run to choose from")
    metric = metric or _run_files(run_dirs[0])[1].eval.select_metric
    lower = lower_is_better(metric)
    scored = []
    for d in run_dirs:
        run = load_run(d)
        value = (run.get("per_market") or {}).get(market, {}).get(metric)
        if not run.get("private", True) or value is None or not np.isfinite(value):
            continue
        seeds = [int(s) for s in run.get("seeds") or [0]]
        try:
            exportable = market in (models_index(Path(d), seeds[0]).get("markets") or {})
        except ExportError:
            exportable = False
        scored.append((float(value), Path(d), run, exportable))
    if not scored:
        raise ExportError(f"no private run reports test {metric} for market {market!r}")
    scored.sort(key=lambda t: t[0] if lower else -t[0])
    candidates = [t for t in scored if t[3]]
    if not candidates:
        raise ExportError(
            f"market {market!r}: none of the {len(scored)} private runs saved a model for it "
            "(floors, Flower or merged runs); train the winner in process with fedmarket run"
        )
    value, best, run, _ = candidates[0]
    text = f"market {market}: {run.get('name') or best.name} has the best test {metric} ({value:.4f})"
    others = [t for t in scored if t[1] != best]
    if others:
        v2, d2, run2, _ = others[0]
        verdict = paired_verdict(
            _seed_values(run, metric).get(market, {}), _seed_values(run2, metric).get(market, {}), metric
        )
        text += f"; runner-up {run2.get('name') or d2.name} ({v2:.4f}), difference {format_verdict(verdict)}"
    if scored[0][1] != best:
        text += f"; {scored[0][2].get('name') or scored[0][1].name} is higher but has no model to export"
    return best, text
