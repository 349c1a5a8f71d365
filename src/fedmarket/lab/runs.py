"""Run-folder housekeeping of the research workflow: combine the seeds of one config that ran in different
processes or machines (`merge_runs`, `merge_grid`), cut a phased run at its first phase (`first_phase_run`),
and keep finished seeds in a small committable archive that outlives run folders (`archive_runs`,
`restore_runs`). ``fedmarket merge|first-phase|archive|restore`` are thin layers over these.

Every function here writes a run folder the way ``fedmarket run`` does (`fedmarket.api.write_results`), from
per-seed records that already exist: nothing is trained again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from fedmarket.api import _write_atomic, _write_json, record_protocol, write_results
from fedmarket.config import ExperimentConfig, config_from_dict, load_run_config
from fedmarket.data.prepare import prepare_data
from fedmarket.errors import FedmarketError
from fedmarket.methods import get_method
from fedmarket.serialization import json_default

log = logging.getLogger(__name__)


def same_run_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """What makes two runs the same experiment: the config without ``seeds``, ``output_dir`` and ``progress``
    (which seeds ran, where the folder is, how it displayed itself). Used to merge seeds and to resume."""
    d = cfg.to_dict()
    # tracking*: where a finished run is recorded, not what it computes
    for key in ("seeds", "output_dir", "progress", "tracking", "tracking_uri", "tracking_experiment"):
        d.pop(key, None)
    return d


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The top-level keys in which two `same_run_config` dicts differ (sorted; empty when the same)."""

    def text(v: Any) -> str:
        return json.dumps(v, default=str, sort_keys=True)

    return sorted(k for k in set(a) | set(b) if text(a.get(k)) != text(b.get(k)))


def merge_runs(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Combine run folders of the SAME config that ran different seeds (e.g. one process or machine per
    seed) into one run folder with every seed, as if one ``fedmarket run`` had run them all.

    The configs must agree on everything but ``seeds``, ``output_dir`` and ``progress`` (how a run displays
    itself, not what it computes); a seed present twice, a missing
    ``seeds/seed<N>.json`` or a different config is an error naming the folder. Nothing is written before
    every input is checked; the output is assembled in a temporary folder and renamed into place.
    FedMM's analysis-only ``alignment.json`` files are merged as well."""

    folders = [Path(d) for d in run_dirs]
    if not folders:
        raise FedmarketError("merge needs at least one run folder")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FedmarketError(f"merge output {out_dir} already exists; choose a new folder")
    cfgs = [load_run_config(d) for d in folders]

    base = same_run_config(cfgs[0])
    records: dict[int, tuple[Path, dict[str, Any]]] = {}
    seconds = 0.0
    for folder, cfg in zip(folders, cfgs, strict=True):
        diff = config_diff(base, same_run_config(cfg))
        if diff:
            raise FedmarketError(
                f"cannot merge {folder} with {folders[0]}: their configs differ in {diff} (only seeds may differ)"
            )
        for seed in cfg.seeds:
            path = folder / "seeds" / f"seed{seed}.json"
            if not path.exists():
                raise FedmarketError(f"{path} is missing: seed {seed} of {folder} did not finish")
            if seed in records:
                raise FedmarketError(f"seed {seed} is in both {records[seed][0]} and {folder}")
            rec = json.loads(path.read_text())
            records[seed] = (folder, rec)
            seconds += float(rec.get("seconds", 0.0))
    first_folder, first = next(iter(records.values()))
    for folder, rec in records.values():
        try:
            record_protocol([first, rec], "merge")
        except FedmarketError as exc:
            raise FedmarketError(f"cannot merge {folder} with {first_folder}: {exc}") from None
    cfg = cfgs[0]
    cfg.seeds = sorted(records)
    cfg.output_dir = str(out_dir.parent)
    per_seed = [records[s][1] for s in cfg.seeds]
    extra: dict[str, Any] = {}
    alignments = [
        json.loads((f / "alignment.json").read_text()) for f in folders if (f / "alignment.json").exists()
    ]
    if alignments:
        import numpy as np

        merged: dict[str, Any] = {"note": alignments[0].get("note", ""), "seeds": {}}
        for a in alignments:
            merged["seeds"].update(a.get("seeds", {}))
        values = list(merged["seeds"].values())
        if values:
            merged["same_code"] = float(np.mean([v["same_code"] for v in values]))
            merged["chance"] = float(np.mean([v["chance"] for v in values]))
            merged["lift"] = merged["same_code"] / merged["chance"] if merged["chance"] > 0 else float("nan")
        extra["alignment.json"] = merged
    return _write_run_folder(cfg, out_dir, per_seed, seconds, extra_files=extra)


def _write_run_folder(
    cfg: ExperimentConfig,
    out_dir: Path,
    per_seed: list[dict[str, Any]],
    seconds: float,
    extra_files: dict[str, Any] | None = None,
    note: str | None = None,
) -> Path:
    """A run folder from finished per-seed records (config, seeds/, extra JSON files, metrics, report),
    assembled in ``<out_dir>.partial`` and renamed into place: it appears whole or not at all."""
    import shutil

    method = get_method(cfg.method.name)
    data = None if method.private else prepare_data(cfg)
    markets = None if data is not None else list(per_seed[0]["communication"]) or list(per_seed[0]["test"])
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "seeds").mkdir(parents=True)
    try:
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        for rec in per_seed:
            _write_json(tmp / "seeds" / f"seed{rec['seed']}.json", rec)
        for name, obj in (extra_files or {}).items():
            _write_json(tmp / name, obj)
        write_results(cfg, tmp, per_seed, seconds, data=data, markets=markets)
        if note:
            metrics = json.loads((tmp / "metrics.json").read_text())
            metrics["notes"].append(note)
            _write_json(tmp / "metrics.json", metrics)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def first_phase_run(run_dir: str | Path, out_dir: str | Path, skip_missing: bool = False) -> Path:
    """A run folder for the first phase of a phased run (FeCoSR / FedAvg + fine-tune: the pre-trained model
    without fine-tuning; one-to-one transfer: zero-shot transfer), as if the run had stopped where its first
    phase ended: each seed's test metrics are those the runtime recorded at that phase end
    (``phase_tests``: each market's best validation round so far), its history and uploads end there.

    Compute is matched by construction: the first phase ran to its own validation plateau, the same rule a
    run without fine-tuning stops at. A seed without a recorded phase end (no ``train.patience``, or a run from
    before phase tests were recorded) is an error naming the file; nothing is written
    before every seed is checked, and the output appears whole or not at all. ``skip_missing=True`` keeps the
    seeds that recorded one instead (an error only if none did)."""

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists():
        raise FedmarketError(f"output {out_dir} already exists; choose a new folder")
    cfg = load_run_config(run_dir)
    per_seed = []
    for seed in cfg.seeds:
        path = run_dir / "seeds" / f"seed{seed}.json"
        if not path.exists():
            raise FedmarketError(f"{path} is missing: seed {seed} of {run_dir} did not finish")
        rec = json.loads(path.read_text())
        phases = rec.get("phase_tests") or []
        if not phases:
            if skip_missing:
                continue
            raise FedmarketError(
                f"{path} records no phase end with test metrics (needs a phased method, train.patience > 0 "
                "and a fedmarket that records phase_tests)"
            )
        end = int(phases[0]["round"])
        first = {
            **rec,
            "test": phases[0]["test"],
            "selected_round": phases[0]["selected_round"],
            "history": [h for h in rec["history"] if int(h["round"]) <= end],
            "uploads": [u for u in rec["uploads"] if int(u["round"]) <= end],
            "phase_tests": [],
            "convergence": {
                **(rec.get("convergence") or {}),
                "rounds_run": end,
                "converged_round": end,
                "phase_ends": [],
            },
        }
        comm = {m: dict(c) for m, c in rec["communication"].items()}
        for m, c in comm.items():
            ups = [u for u in first["uploads"] if u["market"] == m]
            c["up_bytes"], c["rounds"] = int(sum(u["bytes"] for u in ups)), len(ups)
            # older runs did not log downloads per round: they keep the run's total
            if ups and all("down_bytes" in u for u in ups):
                c["down_bytes"] = int(sum(u["down_bytes"] for u in ups))
        first["communication"] = comm
        per_seed.append(first)
    if not per_seed:
        raise FedmarketError(f"no seed of {run_dir} records a phase end with test metrics")
    cfg.seeds = [int(rec["seed"]) for rec in per_seed]
    cfg.name = f"{cfg.name}_phase1"
    cfg.output_dir = str(out_dir.parent)
    seconds = sum(float(rec.get("seconds", 0.0)) for rec in per_seed)
    note = (
        f"first phase of {run_dir}: test at each market's best validation round up to the phase end "
        "(no fine-tuning); seconds are the whole run's"
    )
    return _write_run_folder(cfg, out_dir, per_seed, seconds, note=note)


ARCHIVE_CONFIG = "config.yaml"


def _finished_run_folders(paths: list[str | Path]) -> list[Path]:
    """Each path that is a run folder, or the finished run folders (with metrics.json) below a root
    (`fedmarket.status.find_run_dirs`, which also lists unfinished ones)."""
    from fedmarket.status import find_run_dirs

    found: list[Path] = []
    for p in map(Path, paths):
        folders = find_run_dirs([p])
        if folders != [p]:  # a root: only what finished
            folders = [d for d in folders if (d / "metrics.json").is_file()]
            if not folders:
                raise FedmarketError(
                    f"{p} holds no finished run folder (config.yaml + metrics.json) below it"
                )
        found.extend(folders)
    return found


def archive_runs(paths: list[str | Path], dest: str | Path) -> list[Path]:
    """Keep the per-seed records of finished runs in a small, committable archive that outlives run folders
    (which hold checkpoints, plots and uploads logs, and are not kept): ``dest/<name>/config.yaml`` (the
    experiment without seeds, output folder and display settings) and ``dest/<name>/seed<N>.json.gz`` (the
    seed's whole record, as in ``seeds/seed<N>.json``; ~0.1 MB). Seeds of the same config run in different
    folders, at different times or on different machines accumulate there; `restore_runs` turns an archive
    back into merged run folders.

    ``paths``: run folders (one seed or merged) or roots searched for finished ones. A config that differs from
    the one archived under its name, or a seed archived before with a different record, is an error naming
    both; an identical record is skipped. Nothing is written before every input is checked; each file is
    written to a temporary name and renamed into place. Returns the files written."""
    import gzip

    dest = Path(dest)
    planned: dict[Path, bytes] = {}
    configs: dict[Path, dict[str, Any]] = {}
    sources: dict[Path, Path] = {}
    for folder in _finished_run_folders(paths):
        cfg = load_run_config(folder)
        same = same_run_config(cfg)
        target = dest / cfg.name
        cfg_file = target / ARCHIVE_CONFIG
        old = configs.get(cfg_file)
        if old is None and cfg_file.is_file():
            old = same_run_config(config_from_dict(yaml.safe_load(cfg_file.read_text())))
        diff = config_diff(old, same) if old is not None else []
        if diff:
            raise FedmarketError(
                f"{folder} is config {cfg.name!r} but differs in {diff} from the one archived in {cfg_file} "
                "(rename the config, or archive it elsewhere)"
            )
        configs[cfg_file] = same
        for seed in cfg.seeds:
            src = folder / "seeds" / f"seed{seed}.json"
            if not src.is_file():
                raise FedmarketError(f"{src} is missing: seed {seed} of {folder} did not finish")
            rec = json.loads(src.read_text())
            out = target / f"seed{seed}.json.gz"
            if out in planned or out.is_file():
                before = json.loads(gzip.decompress(planned[out] if out in planned else out.read_bytes()))
                if json.dumps(before, sort_keys=True) != json.dumps(rec, sort_keys=True):
                    where = sources.get(out, out)
                    raise FedmarketError(
                        f"seed {seed} of {cfg.name!r} is archived already ({where}) with a different record "
                        f"than {src}; remove one of them first"
                    )
                continue
            planned[out] = gzip.compress(json.dumps(rec, default=json_default).encode(), mtime=0)
            sources[out] = src
    written = []
    for cfg_file, same in configs.items():
        if not cfg_file.is_file():
            cfg_file.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(cfg_file, yaml.safe_dump(same, sort_keys=False).encode())
            written.append(cfg_file)
    for out, blob in planned.items():
        _write_atomic(out, blob)
        written.append(out)
    return written


def restore_runs(archive: str | Path, out_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """Merged run folders ``out_dir/<name>`` (config, seeds/, metrics, report: what `merge_runs` writes) from an
    archive `archive_runs` wrote, one per archived config (or those in ``names``). ``out_dir/<name>`` must not
    exist; each appears whole or not at all."""
    import gzip

    archive, out_dir = Path(archive), Path(out_dir)
    if not archive.is_dir():
        raise FedmarketError(f"archive {archive} is not a folder")
    folders = sorted(p.parent for p in archive.glob(f"*/{ARCHIVE_CONFIG}"))
    if names is not None:
        known = {f.name: f for f in folders}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise FedmarketError(f"{unknown} not archived in {archive}; archived: {sorted(known)}")
        folders = [known[n] for n in names]
    if not folders:
        raise FedmarketError(f"{archive} holds no archived runs (no */{ARCHIVE_CONFIG})")
    for folder in folders:
        if (out_dir / folder.name).exists():
            raise FedmarketError(f"{out_dir / folder.name} already exists; choose a new --out")
    loaded = []  # every archived record read and checked before anything is written
    for folder in folders:
        files = sorted(folder.glob("seed*.json.gz"))
        if not files:
            raise FedmarketError(f"{folder} holds no seed records (seed<N>.json.gz)")
        try:
            per_seed = sorted(
                (json.loads(gzip.decompress(f.read_bytes())) for f in files), key=lambda r: int(r["seed"])
            )
        except (OSError, ValueError) as exc:
            raise FedmarketError(f"unreadable seed record in {folder}: {exc}") from exc
        loaded.append((folder, per_seed))
    restored = []
    for folder, per_seed in loaded:
        cfg = config_from_dict(yaml.safe_load((folder / ARCHIVE_CONFIG).read_text()))
        cfg.seeds = [int(r["seed"]) for r in per_seed]
        cfg.output_dir = str(out_dir)
        seconds = sum(float(r.get("seconds", 0.0)) for r in per_seed)
        out_dir.mkdir(parents=True, exist_ok=True)
        restored.append(_write_run_folder(cfg, out_dir / folder.name, per_seed, seconds))
    return restored


def merge_grid(root: str | Path, out_dir: str | Path) -> list[Path]:
    """Merge every run folder found under ``root`` (e.g. ``root/seed0/<name>-<stamp>``, one folder per
    seed) by config name into ``out_dir/<name>``; returns the merged folders in name order."""
    root, out_dir = Path(root), Path(out_dir)
    groups: dict[str, list[Path]] = {}
    for cfg_file in sorted(root.rglob("config.yaml")):
        folder = cfg_file.parent
        if not (folder / "metrics.json").exists():
            log.warning("skipping %s: no metrics.json (the run did not finish)", folder)
            continue
        name = yaml.safe_load(cfg_file.read_text())["name"]
        groups.setdefault(name, []).append(folder)
    return [merge_runs(folders, out_dir / name) for name, folders in sorted(groups.items())]
