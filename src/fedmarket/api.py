"""The Python API that the CLI is a thin layer over.

    from fedmarket.api import run_experiment
    from fedmarket.config import load_config
    run_dir = run_experiment(load_config("configs/xmrec_fedavg.yaml"))

A run folder ``runs/<name>-<timestamp>/`` holds the resolved ``config.yaml``, ``metrics.json``,
``rounds.csv`` (validation metrics per round per market), ``uploads.csv`` (what left each market each
round), one checkpoint per seed under ``checkpoints/``, per-seed results under ``seeds/``, ``report.md``
and PNG plots.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fedmarket.config import ExperimentConfig, load_run_config  # noqa: F401  (re-exported)
from fedmarket.data.prepare import PreparedData, prepare_data
from fedmarket.errors import ConfigError, FedmarketError
from fedmarket.eval.metrics import average_over_markets, mean_std_over_seeds
from fedmarket.federation.core import ClientTrainer, Strategy
from fedmarket.federation.runtime import SimulationResult, Simulator
from fedmarket.matmul import configure_torch
from fedmarket.methods import get_method
from fedmarket.serialization import json_default

log = logging.getLogger(__name__)


ACTIVE_RUN_DIR: Path | None = None  # the run folder being written (the CLI names it when interrupted)


def new_run_dir(cfg: ExperimentConfig) -> Path:
    """A new folder ``<output_dir>/<name>-<timestamp>[-N]``, created atomically: two runs started in the
    same second (two processes) never share one."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in range(10_000):
        run_dir = base if i == 0 else base.with_name(f"{base.name}-{i}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise FedmarketError(f"no free run folder name next to {base}")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to ``<path>.tmp`` and rename into place: a reader sees the old file or the whole new one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, json.dumps(obj, indent=2, default=json_default).encode())


def run_seed(
    cfg: ExperimentConfig,
    seed: int,
    data: PreparedData,
    checkpoint: Path | None,
    resume: bool,
    checkpoint_fallback: bool = False,
    models_dir: Path | None = None,
) -> SimulationResult:
    """One seed in process. ``models_dir``: where each market's selected-round model is written for serving
    (`fedmarket.serving`); None writes none."""
    method = get_method(cfg.method.name)
    opts = method.parse_options(cfg.method.options)
    kernels = configure_torch(cfg.train.threads, cfg.train.matmul)
    log.info(
        "%d threads, fp32 matmuls on %s (train.matmul: %s)", cfg.train.threads, kernels, cfg.train.matmul
    )
    trainers, strategy = method.build(cfg, opts, data.splits, seed)
    for key in ("join", "leave"):
        unknown = sorted(set(getattr(cfg.train, key)) - set(trainers))
        if unknown:
            raise ConfigError(f"train.{key}: unknown markets {unknown}; this run has {sorted(trainers)}")
    base_strategy = strategy
    trainers, strategy = protect(cfg, trainers, strategy, seed)
    rounds = cfg.train.rounds
    sim = Simulator(
        trainers,
        strategy,
        method.declaration_for(cfg, opts),
        rounds=rounds,
        local_epochs=cfg.train.local_epochs,
        seed=seed,
        client_fraction=cfg.train.client_fraction,
        min_markets=cfg.train.min_markets,
        secret_sampling=cfg.privacy.mode != "off" and cfg.privacy.secret_sampling,
        max_examples=cfg.train.max_examples,
        eval_every=cfg.eval.every,
        select=cfg.eval.select,
        select_metric=cfg.eval.select_metric,
        full_ranking=cfg.eval.full_ranking,
        checkpoint_path=checkpoint,
        checkpoint_fallback=checkpoint_fallback,
        progress=cfg.progress,
        patience=cfg.train.patience,
        min_delta=cfg.train.min_delta,
        phase_patience=cfg.train.phase_patience,
        stop_slope=cfg.train.stop_slope,
        slope_window=cfg.train.slope_window,
        join=dict(cfg.train.join),
        leave=dict(cfg.train.leave),
        parallel_markets=cfg.train.parallel_markets,
        threads=cfg.train.threads,
    )
    result = sim.run(resume=resume)
    result.privacy["server_step"] = describe_server_step(base_strategy, rounds)
    if models_dir is not None:
        try:
            sim.save_selected_models(models_dir)
        except Exception as exc:  # a serving export problem must not lose the seed's metrics
            log.warning("could not write the selected models of seed %d to %s: %s", seed, models_dir, exc)
    return result


def protect(
    cfg: ExperimentConfig, trainers: dict[str, ClientTrainer], strategy: Strategy, seed: int
) -> tuple[dict[str, ClientTrainer], Strategy]:
    """Apply the config's attack simulation, secure aggregation and differential privacy (in that order:
    a poisoned market poisons before it clips; DP noise is added to what secure aggregation sums)."""
    if cfg.attack.markets:
        unknown = sorted(set(cfg.attack.markets) - set(trainers))
        if unknown:
            raise ConfigError(f"attack.markets: unknown markets {unknown}; this run has {sorted(trainers)}")
        log.warning(
            "ATTACK SIMULATION: markets %s upload %s-poisoned updates (scale %g)",
            cfg.attack.markets,
            cfg.attack.kind,
            cfg.attack.scale,
        )
    trainers = {m: protect_trainer(cfg, t) for m, t in trainers.items()}
    markets = {m for t in trainers.values() for m in t.markets}
    return trainers, protect_strategy(cfg, strategy, seed, num_markets=len(markets))


def dp_settings(cfg: ExperimentConfig, num_markets: int | None = None) -> Any:
    """The config's `fedmarket.federation.privacy.DPSettings` (None with ``privacy.mode: off``).
    ``num_markets``: how many markets the run has (the accounted sampling rate depends on it; None: the
    market side, which needs no rate)."""
    from fedmarket.federation import privacy

    p = cfg.privacy
    if p.mode == "off":
        return None
    q, note = privacy.accounted_sampling(
        num_markets or 1, cfg.train.client_fraction, cfg.train.min_markets, p.secret_sampling
    )
    return privacy.DPSettings(
        mode=p.mode,
        clip_norm=p.clip_norm,
        noise_multiplier=p.noise_multiplier,
        delta=p.delta,
        target_epsilon=p.target_epsilon,
        clipping=p.clipping,
        sampling_rate=q,
        sampling_note=note,
        accountant=p.accountant,
        count_keys=tuple(p.count_keys),
    )


def protect_trainer(cfg: ExperimentConfig, trainer: ClientTrainer) -> ClientTrainer:
    """The market side of `protect`: poisoning (if the market is attacked), then DP clipping (and, with
    ``privacy.mode: client``, the noise). Used by the in-process runtime and by the Flower ClientApp."""
    from fedmarket.federation import attacks, privacy

    if trainer.market in cfg.attack.markets:
        trainer = attacks.PoisonedClient(trainer, cfg.attack.kind, cfg.attack.scale)
    settings = dp_settings(cfg)
    if settings is not None:
        trainer = privacy.PrivateClient(trainer, settings)
    return trainer


def protect_strategy(
    cfg: ExperimentConfig,
    strategy: Strategy,
    seed: int,
    simulate_secure_aggregation: bool = True,
    num_markets: int = 1,
) -> Strategy:
    """The server side of `protect`: simulated secure aggregation (in process only: a runtime with a real
    protocol, the Flower ServerApp with SecAgg+, passes ``simulate_secure_aggregation=False``), then the DP
    noise and accountant."""
    from fedmarket.federation import privacy, secagg

    sa, p = cfg.secure_aggregation, cfg.privacy
    simulate = sa.enabled and simulate_secure_aggregation
    if simulate and p.mode != "server":
        strategy = secagg.SecureAggregation(strategy, seed, sa.fraction_bits)
    settings = dp_settings(cfg, num_markets)
    if settings is not None:
        # mode server + secure aggregation: the server learns only the sum of clipped deltas, then adds noise
        secure_sum = secagg.summer(seed, sa.fraction_bits) if simulate and p.mode == "server" else None
        strategy = privacy.PrivateStrategy(strategy, settings, seed, secure_sum)
    return strategy


def describe_server_step(strategy: Strategy, rounds: int) -> dict[str, Any]:
    """Which rounds' server steps are weighted sums (secure aggregation can hide the uploads) and why the
    others are not; shown in every run report."""
    from fedmarket.federation.secagg import server_step_kind

    groups: dict[tuple[bool, str], list[int]] = {}
    for r in range(1, rounds + 1):
        groups.setdefault(server_step_kind(strategy, r), []).append(r)
    return {
        "strategy": type(strategy).__name__,
        "kinds": [{"sum": k[0], "reason": k[1], "rounds": v} for k, v in groups.items()],
    }


def run_experiment(
    cfg: ExperimentConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    checkpoint_fallback: bool = False,
) -> Path:
    """Run every seed of ``cfg`` and write the run folder. With ``resume=True`` and an existing
    ``run_dir``, finished seeds are kept and an interrupted seed continues from its last round checkpoint."""
    method = get_method(cfg.method.name)
    method.parse_options(cfg.method.options)  # fail on bad options before loading data
    data = prepare_data(cfg)
    if run_dir is None:
        run_dir = new_run_dir(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    global ACTIVE_RUN_DIR
    ACTIVE_RUN_DIR = run_dir
    (run_dir / "seeds").mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    started = time.perf_counter()
    per_seed: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        seed_file = run_dir / "seeds" / f"seed{seed}.json"
        if resume and seed_file.exists():
            per_seed.append(json.loads(seed_file.read_text()))
            continue
        log.info("%s: seed %d", cfg.name, seed)
        t0 = time.perf_counter()
        checkpoint = run_dir / "checkpoints" / f"seed{seed}.ckpt"
        models_dir = run_dir / "models" / f"seed{seed}"
        result = run_seed(cfg, seed, data, checkpoint, resume, checkpoint_fallback, models_dir=models_dir)
        seconds = result.elapsed_before + time.perf_counter() - t0  # a resumed seed counts its earlier part
        record = seed_record(
            seed,
            result,
            seconds,
            cfg.eval.protocol,
            data_fingerprint=data.fingerprint,
            evaluation=data.evaluation(),
        )
        _write_json(seed_file, record)
        per_seed.append(record)
    # the run's compute: every seed's seconds, the parts before a resume included
    seconds = max(time.perf_counter() - started, sum(float(r.get("seconds", 0.0)) for r in per_seed))
    write_results(cfg, run_dir, per_seed, seconds, data=data)
    from fedmarket.tracking import track_run

    track_run(cfg, run_dir)  # config `tracking`: from the finished folder's files; a failure only warns
    return run_dir


def seed_record(
    seed: int,
    result: SimulationResult,
    seconds: float,
    protocol_version: int,
    data_fingerprint: str | None = None,
    evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One seed's results as stored in ``seeds/seed<N>.json`` (any runtime: in-process or Flower). A record
    without ``protocol_version`` was made under protocol 1."""
    return {
        "seed": seed,
        "protocol_version": int(protocol_version),
        "data_fingerprint": data_fingerprint,
        "evaluation": evaluation or {},
        "test": result.test,
        "history": result.history,
        "communication": result.communication,
        "failures": result.failures,
        "selected_round": result.selected_round,
        "uploads": result.uploads,
        "privacy": result.privacy,
        "convergence": result.convergence,
        "phase_tests": result.phase_tests,
        "seconds": seconds,
        **({"participation": result.participation} if result.participation else {}),
    }


def write_results(
    cfg: ExperimentConfig,
    run_dir: Path,
    per_seed: list[dict[str, Any]],
    seconds: float,
    data: PreparedData | None = None,
    markets: list[str] | None = None,
) -> None:
    """Write ``metrics.json``, ``rounds.csv``, ``uploads.csv`` and the report of a run folder. A runtime
    that never holds the markets' data (the Flower ServerApp) passes ``markets`` instead of ``data``."""
    metrics = summarize(cfg, per_seed, data, seconds, markets=markets)
    _write_json(run_dir / "metrics.json", metrics)
    rows = [row for rec in per_seed for row in rec["history"]]
    pd.DataFrame(rows).to_csv(run_dir / "rounds.csv", index=False)
    uploads = [
        {**{k: v for k, v in u.items() if k != "keys"}, "keys": json.dumps(u["keys"])}
        for rec in per_seed
        for u in rec["uploads"]
    ]
    pd.DataFrame(uploads, columns=["seed", "round", "market", "bytes", "keys"]).to_csv(
        run_dir / "uploads.csv", index=False
    )
    try:
        from fedmarket.report import write_run_report

        write_run_report(run_dir)
    except Exception as exc:  # a plotting problem must not lose the metrics
        log.warning("could not write the run report for %s: %s", run_dir, exc)


def summarize(
    cfg: ExperimentConfig,
    per_seed: list[dict[str, Any]],
    data: PreparedData | None,
    seconds: float,
    markets: list[str] | None = None,
) -> dict[str, Any]:
    method = get_method(cfg.method.name)
    if data is None and (markets is None or not method.private):
        raise FedmarketError("summarize needs the prepared data (or, for a private method, the market list)")
    markets = list(data.splits) if data is not None else list(markets)
    protocol, fingerprint = record_protocol(per_seed, f"run {cfg.name!r}")
    per_market_mean, per_market_std = {}, {}
    for m in markets:
        mean, std = mean_std_over_seeds([rec["test"].get(m, {}) for rec in per_seed])
        per_market_mean[m], per_market_std[m] = mean, std
    average_mean, average_std = mean_std_over_seeds([average_over_markets(rec["test"]) for rec in per_seed])
    first = per_seed[0]
    notes = [method.summary] if method.summary else []
    if method.private:
        communication = {
            m: dict(first["communication"].get(m, {"up_bytes": 0, "down_bytes": 0, "rounds": 0}))
            for m in markets
        }
    else:
        # pooling ships each market's raw train interactions once (user, item, timestamp as int64)
        communication = {
            m: {"up_bytes": int(len(s.train_index) * 3 * 8), "down_bytes": 0, "rounds": 1}
            for m, s in data.splits.items()
        }
        notes.append("not private: pools raw data; up_bytes = raw train interactions (3 int64 per row)")
    failures = [f for rec in per_seed for f in rec["failures"]]
    if cfg.attack.markets:
        notes.append(
            f"ATTACK SIMULATION: markets {cfg.attack.markets} uploaded {cfg.attack.kind}-poisoned updates "
            f"(scale {cfg.attack.scale}); their own metrics are honest, the aggregate is not"
        )
    privacy_record = dict(first.get("privacy") or {})
    # a runtime that did not apply a configured wrapper must not look private (both runtimes apply them;
    # this guards against a new runtime or path that forgets to)
    applied = {
        "privacy.mode": "epsilon" in privacy_record or cfg.privacy.mode == "off",
        "secure_aggregation.enabled": "secure_aggregation" in privacy_record
        or not cfg.secure_aggregation.enabled,
        "attack.markets": not cfg.attack.markets
        or any(h.get("train_poisoned") for rec in per_seed for h in rec["history"]),
    }
    for key, ok in applied.items():
        if not ok:
            log.error("%s is configured but this runtime did not apply it", key)
            notes.append(f"WARNING: {key} is configured but this runtime did not apply it (no guarantee)")
    if "epsilon" in privacy_record:
        privacy_record["epsilon_by_seed"] = {
            str(rec["seed"]): (rec.get("privacy") or {}).get("epsilon") for rec in per_seed
        }
    label = (
        cfg.method.name
        if not cfg.model.name or method.task == "floor"
        else f"{cfg.method.name}-{cfg.model.name}"
    )
    return {
        "name": cfg.name,
        "label": label,
        "method": cfg.method.name,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "private": method.private,
        "protocol_version": protocol,
        "data_fingerprint": fingerprint,
        "evaluation": data.evaluation() if data is not None else dict(first.get("evaluation") or {}),
        "seeds": [rec["seed"] for rec in per_seed],
        "markets": markets,
        "per_market": per_market_mean,
        "per_market_std": per_market_std,
        "average": average_mean,
        "average_std": average_std,
        "communication": communication,
        "upload_declaration": {
            "patterns": list(method.declaration_for(cfg).patterns),
            "reason": method.declaration_for(cfg).reason,
            "metrics": list(method.declaration_for(cfg).metric_patterns),
        },
        "selected_round": {str(rec["seed"]): rec["selected_round"] for rec in per_seed},
        "convergence": {str(rec["seed"]): rec["convergence"] for rec in per_seed if rec.get("convergence")},
        "failures": [{k: v for k, v in f.items() if k != "traceback"} for f in failures],
        "privacy": privacy_record,
        "notes": notes,
        "seconds": seconds,
        "config": cfg.to_dict(),
    }


def record_protocol(per_seed: list[dict[str, Any]], where: str) -> tuple[int, str | None]:
    """The protocol version and data fingerprint shared by seed records; records of different protocol
    versions or data are never combined (a record without a version was made under protocol 1)."""
    versions = sorted({int(rec.get("protocol_version") or 1) for rec in per_seed})
    if len(versions) > 1:
        seeds = {
            v: [rec["seed"] for rec in per_seed if int(rec.get("protocol_version") or 1) == v]
            for v in versions
        }
        raise FedmarketError(
            f"{where}: seeds ran under different evaluation protocols {seeds}; they cannot be combined"
        )
    prints = sorted({rec["data_fingerprint"] for rec in per_seed if rec.get("data_fingerprint")})
    if len(prints) > 1:
        raise FedmarketError(
            f"{where}: seeds ran on different data (fingerprints {prints}); they cannot be combined"
        )
    return versions[0], (prints[0] if prints else None)
