"""What joining is worth for a new market: ``fedmarket onboard``.

A market arrives with little data. For a chosen newcomer it simulates arriving with only the first k % of its
train interactions by time (validation, test and the item catalog stay those of the whole market, so every k
is scored on the same users and candidates) and compares, at each k, four ways to start:

- ``local``: the method's model trained on the newcomer's own data alone;
- ``transfer``: one-to-one transfer. Every other market trains the same model alone (on all its data); the
  newcomer starts from one source's shared parameters (those the method lets leave a market) and trains on its
  own data. The source is chosen on the newcomer's validation score, so the best single source is reported;
- ``late``: the federation of the other markets runs ``join_round - 1`` rounds without it, then it joins
  (`train.join`): it gets the current global model and takes part from then on;
- ``start``: it takes part in the federation from round 1.

Every option ends the same way: the newcomer trains alone up to ``alone_rounds`` rounds, stopped at its
validation plateau (``patience``), and its round is selected on validation; the options differ only in where
that training starts (``late`` and ``start``: from its model after ``rounds`` rounds of its own in the
federation). So no option is cut short: a market with a few hundred rows gets one gradient step per round, and
a fixed round budget would favour whichever option trains longest. Only the newcomer's test metric is
compared. A cell (newcomer, seed, k) is written to
``<out>/cells/`` when done, so an interrupted grid resumes, and ``<out>/onboard.md`` + ``onboard.png`` are
rewritten from the cells: the curve "test metric vs own data" per option, 95 % intervals over seeds, paired
differences against ``local``, and the data size from which joining stops paying off.

Methods of the FedAvg family are supported (a model whose shared parameters are averaged: ``fedavg``,
``fedprox``, ``fedper``, ``mtl_fedavg``, ``mtl_fedprox``, ``seq_fedavg_id``...). Late join itself works for
every method (`train.join`); the curves need a local and a transfer counterpart that phased methods do not have
in one model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from fedmarket.checkpoint import load_state, save_state
from fedmarket.config import ExperimentConfig
from fedmarket.data.prepare import prepare_data
from fedmarket.data.split import MarketSplit, SeenItems
from fedmarket.errors import ConfigError
from fedmarket.eval.metrics import lower_is_better
from fedmarket.eval.verdicts import format_verdict, paired_verdict
from fedmarket.federation.core import Strategy, Update
from fedmarket.federation.payload import Payload
from fedmarket.federation.runtime import Simulator
from fedmarket.federation.strategies import FedAvg, FederatedPhase, NoFederation
from fedmarket.matmul import configure_torch
from fedmarket.methods import get_method

log = logging.getLogger(__name__)

OPTIONS = ("local", "transfer", "late", "start")
FLOORS = (
    "popularity",
    "popularity_recency",
)  # no learning, on the newcomer's same k %: what every option must clear
FRACTIONS = (5, 10, 25, 50, 100)


# ------------------------------------------------------------------ the newcomer's data
def first_fraction(split: Any, percent: float) -> Any:
    """``split`` with only the first ``percent`` % of its train rows by time (at least one; ties, and a market
    without timestamps, keep row order). Validation, test, the catalog and the ID space are unchanged. Works on
    a `MarketSplit` (interactions: the seen items follow the kept rows) and on a multi-task `MTLSplit`
    (impressions)."""
    if not 0 < percent <= 100:
        raise ConfigError(f"onboard fractions must be in (0, 100], got {percent}")
    if percent == 100:
        return split
    index = split.train_index
    market = split.market
    times = getattr(market, "timestamps", None)
    order = np.argsort(times[index], kind="stable") if times is not None else np.arange(len(index))
    keep = np.sort(index[order[: max(1, math.ceil(len(index) * percent / 100))]])
    if not isinstance(split, MarketSplit):
        return dataclasses.replace(split, train_index=keep)
    seen = SeenItems.build(market.users[keep], market.items[keep], market.num_users, market.num_items)
    return dataclasses.replace(split, train_index=keep, train_seen=seen)


# ------------------------------------------------------------------ strategies of the comparison
class StartFrom(Strategy):
    """Send one payload with the first round, nothing afterwards, aggregate nothing: a market that starts
    from a source model and trains on its own data."""

    def __init__(self, payload: Payload) -> None:
        self.payload = payload

    def initialize(self, initial: Payload) -> None:
        return None

    def configure_train(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        return {m: (self.payload if server_round == 1 else {}) for m in markets}

    def configure_evaluate(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        return {m: {} for m in markets}

    def aggregate_train(self, server_round: int, updates: dict[str, Update]) -> None:
        return None

    def round_options(self, server_round: int) -> dict[str, Any]:
        return {"upload": False}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class Alone(NoFederation):
    """Local training in which the trainer is told to upload nothing (a federated method's trainer alone)."""

    def round_options(self, server_round: int) -> dict[str, Any]:
        return {"upload": False}


@dataclasses.dataclass
class Plan:
    """One onboarding study (see the module doc)."""

    cfg: ExperimentConfig
    newcomers: list[str]
    fractions: list[float]
    seeds: list[int]
    rounds: int  # the newcomer's own rounds in the federation (``late`` and ``start``)
    join_round: int  # ``late``: the round it joins (the others ran join_round - 1 rounds before)
    out: Path
    # ``local`` and ``transfer`` (and the sources) train alone, which is cheap: up to ``alone_rounds`` rounds,
    # stopped at the validation plateau (``patience``), so the baselines are never cut short
    alone_rounds: int = 200
    patience: int = 3

    def validate(self, markets: list[str]) -> None:
        method = get_method(self.cfg.method.name)
        if not _federated_average(method, self.cfg):
            raise ConfigError(
                f"onboard: method {method.name!r} is not of the FedAvg family (its strategy must average one "
                "shared model); late join itself works for it with train.join"
            )
        unknown = sorted(set(self.newcomers) - set(markets))
        if unknown:
            raise ConfigError(f"onboard: unknown markets {unknown}; the config's markets are {markets}")
        if len(markets) < 2:
            raise ConfigError("onboard needs at least two markets (a newcomer and a federation)")
        if self.rounds < 1 or self.join_round < 2:
            raise ConfigError("onboard: --rounds must be >= 1 and --join-round >= 2")
        for percent in self.fractions:
            if not 0 < percent <= 100:
                raise ConfigError(f"onboard: fractions must be in (0, 100], got {percent}")


def _federated_average(method: Any, cfg: ExperimentConfig) -> bool:
    if not method.private:
        return False
    _, strategy = method.build(cfg, method.parse_options(cfg.method.options), {}, 0)
    phased = isinstance(strategy, FederatedPhase) and strategy.federated_rounds > 0
    return isinstance(strategy, FedAvg) and not phased


def _simulator(cfg, trainers, strategy, declaration, rounds, seed, **settings) -> Simulator:
    return Simulator(
        trainers,
        strategy,
        declaration,
        rounds=rounds,
        local_epochs=cfg.train.local_epochs,
        seed=seed,
        max_examples=cfg.train.max_examples,
        select=cfg.eval.select,
        select_metric=cfg.eval.select_metric,
        full_ranking=cfg.eval.full_ranking,
        progress=False,
        **settings,
    )


def _outcome(result: Any, market: str, seconds: float, **extra: Any) -> dict[str, Any]:
    return {
        "test": result.test.get(market, {}),
        "selected_round": result.selected_round.get(market),
        "up_bytes": result.communication.get(market, {}).get("up_bytes", 0),
        "down_bytes": result.communication.get(market, {}).get("down_bytes", 0),
        "failures": [f for f in result.failures if f["market"] == market],
        "seconds": seconds,
        **extra,
    }


class Study:
    """Runs the cells of a `Plan` in one process (`run_cell`); the data is loaded once per process."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.cfg = plan.cfg
        self.method = get_method(self.cfg.method.name)
        self.opts = self.method.parse_options(self.cfg.method.options)
        self.declaration = self.method.declaration_for(self.cfg, self.opts)
        self.data = prepare_data(self.cfg)
        configure_torch(self.cfg.train.threads, self.cfg.train.matmul)
        self.sources: dict[int, dict[str, Payload]] = {}

    def splits(self, newcomer: str, percent: float) -> dict[str, Any]:
        return {n: (first_fraction(s, percent) if n == newcomer else s) for n, s in self.data.splits.items()}

    def trainers(self, splits: dict[str, Any], seed: int) -> dict[str, Any]:
        trainers, _ = self.method.build(self.cfg, self.opts, splits, seed)
        return trainers

    def federation(self, seed: int) -> FedAvg:
        _, strategy = self.method.build(self.cfg, self.opts, {}, seed)
        return strategy

    # ---------------------------------------------------------------- the four options
    def _alone(self, trainers: dict[str, Any], strategy: Strategy, seed: int) -> Simulator:
        p = self.plan
        return _simulator(
            self.cfg, trainers, strategy, self.declaration, p.alone_rounds, seed, patience=p.patience
        )

    def local(self, newcomer: str, split: Any, seed: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        trainers = self.trainers({newcomer: split}, seed)
        sim = self._alone(trainers, Alone(), seed)
        return _outcome(sim.run(), newcomer, time.perf_counter() - t0)

    def source_models(self, seed: int) -> dict[str, Payload]:
        """Every market's shared parameters at its best round, each trained alone on all its data (cached)."""
        cache = self.plan.out / "sources" / f"seed{seed}.ckpt"
        if seed not in self.sources and cache.exists():
            self.sources[seed] = load_state(cache)
        if seed not in self.sources:
            trainers = self.trainers(dict(self.data.splits), seed)
            sim = self._alone(trainers, Alone(), seed)
            sim.run()  # the final test leaves each trainer at its selected round
            models = {m: t.initial_payload() for m, t in sim.transport.export_trainers().items()}
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_state(cache, models, keep_previous=False)
            self.sources[seed] = models
        return self.sources[seed]

    def transfer(self, newcomer: str, split: Any, seed: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        metric = self.cfg.eval.select_metric
        best: tuple[float, str, Any] | None = None
        scores = {}
        for source, payload in self.source_models(seed).items():
            if source == newcomer:
                continue
            trainers = self.trainers({newcomer: split}, seed)
            sim = self._alone(trainers, StartFrom(payload), seed)
            result = sim.run()
            score = float(sim.ledger.best.get(newcomer, {}).get("score", np.nan))
            scores[source] = score
            better = best is None or (score < best[0] if lower_is_better(metric) else score > best[0])
            if not np.isnan(score) and better:
                best = (score, source, result)
        if best is None:
            raise ConfigError(f"onboard: no source gave {newcomer} a validation {metric}")
        return _outcome(best[2], newcomer, time.perf_counter() - t0, source=best[1], source_valid=scores)

    def start(self, newcomer: str, splits: dict[str, Any], seed: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        sim = _simulator(
            self.cfg,
            self.trainers(splits, seed),
            self.federation(seed),
            self.declaration,
            self.plan.rounds,
            seed,
            parallel_markets=self.cfg.train.parallel_markets,
        )
        return self._then_alone(sim, sim.run(), newcomer, seed, t0)

    def _then_alone(self, sim: Simulator, federated: Any, newcomer: str, seed: int, t0: float, **extra: Any):
        """After its federated rounds the newcomer trains alone from its selected federated state to its
        validation plateau, as ``local`` and ``transfer`` do: every option ends the same way and differs only in
        where it starts. The record keeps the federated part's metrics and bytes."""
        trainer = sim.transport.export_trainers()[
            newcomer
        ]  # at its selected round (the final test loaded it)
        alone = self._alone({newcomer: trainer}, Alone(), seed)
        result = alone.run()
        out = _outcome(result, newcomer, time.perf_counter() - t0, **extra)
        fed = _outcome(federated, newcomer, 0.0)
        out.update(up_bytes=fed["up_bytes"], down_bytes=fed["down_bytes"])
        out["failures"] = fed["failures"] + out["failures"]
        out["federated"] = {"test": fed["test"], "selected_round": fed["selected_round"]}
        return out

    def base_path(self, newcomer: str, seed: int) -> Path:
        return self.plan.out / "federations" / f"{newcomer}_seed{seed}_round{self.plan.join_round - 1}.ckpt"

    def federation_before(self, newcomer: str, seed: int) -> Path:
        """The federation's first ``join_round - 1`` rounds without the newcomer (they do not depend on its
        data): run once per (newcomer, seed) and checkpointed."""
        base = self.base_path(newcomer, seed)
        if base.exists():
            return base
        base.parent.mkdir(parents=True, exist_ok=True)
        tmp = base.with_name(f"{base.name}.{os.getpid()}.partial")
        sim = _simulator(
            self.cfg,
            self.trainers(dict(self.data.splits), seed),
            self.federation(seed),
            self.declaration,
            self.plan.join_round - 1,
            seed,
            join={newcomer: self.plan.join_round},
            checkpoint_path=tmp,
            parallel_markets=self.cfg.train.parallel_markets,
        )
        sim.run()
        save_state(base, load_state(tmp), keep_previous=False)  # with its checksum, under its final name
        for path in tmp.parent.glob(tmp.name + "*"):
            path.unlink(missing_ok=True)
        return base

    def late(self, newcomer: str, splits: dict[str, Any], seed: int) -> dict[str, Any]:
        """Resume the federation's checkpoint before the join with the newcomer's fresh model for its data."""
        t0 = time.perf_counter()
        base = self.federation_before(newcomer, seed)
        trainers = self.trainers(splits, seed)
        ckpt = base.with_name(f"{newcomer}_seed{seed}_{os.getpid()}.ckpt")
        state = load_state(base)
        state["trainers"][newcomer] = trainers[newcomer].state_dict()  # its own data's fresh model
        save_state(ckpt, state, keep_previous=False)
        try:
            sim = _simulator(
                self.cfg,
                trainers,
                self.federation(seed),
                self.declaration,
                self.plan.join_round - 1 + self.plan.rounds,
                seed,
                join={newcomer: self.plan.join_round},
                checkpoint_path=ckpt,
                parallel_markets=self.cfg.train.parallel_markets,
            )
            result = sim.run(resume=True)
        finally:
            for path in ckpt.parent.glob(ckpt.name + "*"):
                path.unlink(missing_ok=True)
        return self._then_alone(sim, result, newcomer, seed, t0, joined_round=self.plan.join_round)

    def floors(self, newcomer: str, split: Any, seed: int) -> dict[str, dict[str, float]]:
        """The newcomer's test metrics under the no-learning floors (`fedmarket.methods.floors`), scored from
        the same k % of its train data on the same candidates as the options."""
        out = {}
        for name in FLOORS:
            method = get_method(name)
            opts = method.parse_options({})
            trainers, strategy = method.build(self.cfg, opts, {newcomer: split}, seed)
            sim = _simulator(self.cfg, trainers, strategy, method.declaration_for(self.cfg, opts), 1, seed)
            out[name] = sim.run().test.get(newcomer, {})
        return out

    def add_floors(self, path: Path) -> None:
        """A cell written before the floors were part of it gets them (and its protocol record) added."""
        cell = json.loads(path.read_text())
        split = self.splits(cell["newcomer"], cell["percent"])[cell["newcomer"]]
        cell.update(self.record())
        cell["floors"] = self.floors(cell["newcomer"], split, cell["seed"])
        _write_cell(path, cell)

    def record(self) -> dict[str, Any]:
        """What the cells were measured under: a study merges only cells with the same record."""
        return {"protocol_version": int(self.cfg.eval.protocol), "data_fingerprint": self.data.fingerprint}

    # ---------------------------------------------------------------- one cell
    def run_cell(self, newcomer: str, seed: int, percent: float) -> dict[str, Any]:
        splits = self.splits(newcomer, percent)
        split = splits[newcomer]
        cell = {
            "newcomer": newcomer,
            "seed": seed,
            "percent": percent,
            "train_interactions": int(len(split.train_index)),
            "metric": self.cfg.eval.select_metric,
            **self.record(),
            "floors": self.floors(newcomer, split, seed),
            "options": {
                "local": self.local(newcomer, split, seed),
                "transfer": self.transfer(newcomer, split, seed),
                "late": self.late(newcomer, splits, seed),
                "start": self.start(newcomer, splits, seed),
            },
        }
        return cell


# ------------------------------------------------------------------ the grid
def cell_path(out: Path, newcomer: str, seed: int, percent: float) -> Path:
    return out / "cells" / f"{newcomer}_seed{seed}_k{percent:g}.json"


def _write_cell(path: Path, cell: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(cell, indent=1, default=float))
    os.replace(tmp, path)


_STUDY: Study | None = None


def _work(plan: Plan, task: tuple) -> str:
    """One task in a worker process: ``("sources", seed)``, ``("before", newcomer, seed)`` (shared by the
    cells, run first) or ``("cell", newcomer, seed, k)``."""
    global _STUDY
    if _STUDY is None or _STUDY.plan != plan:
        _STUDY = Study(plan)
    kind = task[0]
    if kind == "sources":
        _STUDY.source_models(task[1])
    elif kind == "before":
        _STUDY.federation_before(task[1], task[2])
    elif kind == "floors":
        _STUDY.add_floors(cell_path(plan.out, *task[1:]))
    else:
        _, newcomer, seed, percent = task
        _write_cell(cell_path(plan.out, newcomer, seed, percent), _STUDY.run_cell(newcomer, seed, percent))
    return " ".join(f"{t:g}" if isinstance(t, float) else str(t) for t in task)


def _run_tasks(plan: Plan, tasks: list[tuple], workers: int, echo: Callable[[str], None]) -> None:
    started = time.perf_counter()
    if workers <= 1:
        for i, task in enumerate(tasks, 1):
            name = _work(plan, task)
            echo(f"[{i}/{len(tasks)}] {name} done ({time.perf_counter() - started:.0f} s)")
        return
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_work, plan, task) for task in tasks]
        for i, fut in enumerate(as_completed(futures), 1):
            echo(f"[{i}/{len(tasks)}] {fut.result()} done ({time.perf_counter() - started:.0f} s)")


def run_plan(plan: Plan, workers: int = 1, echo: Callable[[str], None] = print) -> Path:
    """Run every missing cell (``workers`` processes), then write the report."""
    data = prepare_data(plan.cfg)
    plan.validate(list(data.splits))
    for n in plan.newcomers:  # a split the study cannot cut fails here, before any training
        first_fraction(data.splits[n], min(plan.fractions))
        if getattr(data.splits[n].market, "timestamps", None) is None:
            log.warning(
                "onboard: market %r has no timestamps; its first k %% are its first rows in file order", n
            )
    (plan.out / "cells").mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in dataclasses.asdict(plan).items() if k != "cfg"}
    (plan.out / "plan.json").write_text(
        json.dumps({**record, "config": plan.cfg.to_dict()}, indent=1, default=str)
    )
    cells = [
        ("cell", n, s, k)
        for s in plan.seeds
        for n in plan.newcomers
        for k in plan.fractions
        if not cell_path(plan.out, n, s, k).exists()
    ]
    older = [  # finished before the floors were part of a cell: only the floors run
        ("floors", c["newcomer"], c["seed"], c["percent"]) for c in load_cells(plan.out) if "floors" not in c
    ]
    shared = [("sources", s) for s in sorted({c[2] for c in cells})]
    shared += [("before", n, s) for s, n in sorted({(c[2], c[1]) for c in cells})]
    echo(
        f"onboard: {len(cells)} cell(s) to run"
        + (f", {len(older)} older cell(s) to add the floors to" if older else "")
        + f" ({workers} worker(s)); results in {plan.out}"
    )
    _run_tasks(plan, shared, workers, echo)
    _run_tasks(plan, cells + older, workers, echo)
    return write_report(plan.out)


# ------------------------------------------------------------------ the report
def load_cells(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]


def curves(cells: list[dict[str, Any]]) -> dict[str, dict[str, dict[float, dict[int, float]]]]:
    """newcomer -> option -> k -> seed -> test metric."""
    out: dict[str, dict[str, dict[float, dict[int, float]]]] = {}
    for c in cells:
        for option, o in c["options"].items():
            value = o["test"].get(c["metric"])
            if value is not None:
                out.setdefault(c["newcomer"], {}).setdefault(option, {}).setdefault(c["percent"], {})[
                    c["seed"]
                ] = float(value)
    return out


def _interval(values: list[float]) -> tuple[float, float]:
    from scipy import stats

    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, float("nan")
    half = float(stats.t.ppf(0.975, len(values) - 1)) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return mean, half


def pays_until(by_option: dict[str, dict[float, dict[int, float]]], metric: str) -> dict[str, Any]:
    """For each joining option, its paired verdict against ``local`` at every k, the k's where it wins, ties,
    loses, and ``pays_up_to``: the largest k up to which it wins at every k measured (None: not even at the
    smallest), with ``stops_paying_at`` the next k measured (None: it pays at every k)."""
    out = {}
    local = by_option.get("local", {})
    for option in ("transfer", "late", "start"):
        verdicts = {
            k: paired_verdict(by_option.get(option, {}).get(k, {}), local.get(k, {}), metric)
            for k in sorted(local)
        }
        ks = sorted(verdicts)
        upto = None
        for k in ks:
            if verdicts[k]["verdict"] != "wins":
                break
            upto = k
        after = [k for k in ks if upto is None or k > upto]
        out[option] = {
            "verdicts": verdicts,
            **{
                f"{v}_at": [k for k in ks if verdicts[k]["verdict"] == v]
                for v in ("wins", "tie", "loses", "untested")
            },
            "pays_up_to": upto,
            "stops_paying_at": after[0] if after else None,
        }
    return out


def _sentence(option: str, v: dict[str, Any]) -> str:
    def ks(values: list[float]) -> str:
        return ", ".join(f"{k:g}%" for k in values)

    parts = []
    for key, word in (
        ("wins_at", "beats local"),
        ("tie_at", "ties with local"),
        ("loses_at", "loses to local"),
    ):
        if v[key]:
            parts.append(f"{word} at k = {ks(v[key])}")
    if v["untested_at"]:
        parts.append(f"is untested (fewer than 3 seeds) at k = {ks(v['untested_at'])}")
    return f"- `{option}` " + "; ".join(parts) + "."


def write_report(out: Path) -> Path:
    cells = load_cells(out)
    if not cells:
        raise ConfigError(f"onboard: no finished cells under {out / 'cells'}")
    metric = cells[0]["metric"]
    records = {(c.get("protocol_version"), c.get("data_fingerprint")) for c in cells}
    if len(records) > 1:
        raise ConfigError(
            f"onboard: the cells under {out / 'cells'} were measured under different protocols or data "
            f"(protocol, fingerprint): {sorted(records, key=str)}"
        )
    protocol = next(iter(records))[0]
    data = curves(cells)
    floors: dict[tuple[str, str, float], list[float]] = {}
    for c in cells:
        for name, test in (c.get("floors") or {}).items():
            if metric in test:
                floors.setdefault((c["newcomer"], name, c["percent"]), []).append(float(test[metric]))
    sizes = {(c["newcomer"], c["percent"]): c["train_interactions"] for c in cells}
    lines = [
        "# What joining the federation is worth for a new market",
        "",
        f"Test {metric} of the newcomer (mean ± 95 % interval over seeds) by the share of its own train data it",
        "arrives with (the first k % by time; same validation, test and catalog at every k). Differences are",
        "paired by seed against `local`; `wins` = the interval excludes 0. The floors score the same k % with no",
        f"learning (train counts; counts weighted by recency). Evaluation protocol {protocol or '?'}.",
        "",
    ]
    for newcomer, by_option in sorted(data.items()):
        ks = sorted({k for o in by_option.values() for k in o})
        lines += [f"## Newcomer `{newcomer}`", ""]
        header = ["option"] + [f"k={k:g}% ({sizes.get((newcomer, k), '?')} rows)" for k in ks]
        rows = [
            [f"{name} (no learning)"]
            + [
                f"{np.mean(floors[(newcomer, name, k)]):.4f}" if (newcomer, name, k) in floors else "–"
                for k in ks
            ]
            for name in FLOORS
        ]
        for option in OPTIONS:
            row = [option]
            for k in ks:
                values = list(by_option.get(option, {}).get(k, {}).values())
                if not values:
                    row.append("–")
                    continue
                mean, half = _interval(values)
                row.append(
                    f"{mean:.4f}" + ("" if math.isnan(half) else f" ± {half:.4f}") + f" (n={len(values)})"
                )
            rows.append(row)
        verdict = pays_until(by_option, metric)
        for option in ("transfer", "late", "start"):
            rows.append(
                [f"{option} − local"]
                + [format_verdict(verdict[option]["verdicts"].get(k, {"n": 0})) for k in ks]
            )
        lines += _table(header, rows) + [""]
        for option in ("transfer", "late", "start"):
            lines.append(_sentence(option, verdict[option]))
        lines.append(_floor_sentence(newcomer, by_option, floors, ks, metric))
        lines.append("")
    (out / "onboard.md").write_text("\n".join(lines))
    (out / "onboard.json").write_text(
        json.dumps({n: pays_until(b, metric) for n, b in data.items()}, indent=1, default=float)
    )
    plot(data, metric, out / "onboard.png")
    return out / "onboard.md"


def _floor_sentence(newcomer, by_option, floors, ks, metric) -> str:
    """Where each option's mean clears the higher of the two floors (what no learning reaches)."""
    sign = -1.0 if lower_is_better(metric) else 1.0
    parts = []
    for option in OPTIONS:
        above = []
        for k in ks:
            values = list(by_option.get(option, {}).get(k, {}).values())
            bars = [float(np.mean(floors[(newcomer, f, k)])) for f in FLOORS if (newcomer, f, k) in floors]
            if values and bars and sign * float(np.mean(values)) > max(sign * b for b in bars):
                above.append(f"{k:g}%")
        parts.append(f"`{option}` at {', '.join(above) if above else 'no k'}")
    return "- above both no-learning floors: " + "; ".join(parts) + "."


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def plot(data: dict[str, dict[str, dict[float, dict[int, float]]]], metric: str, path: Path) -> None:
    """One panel per newcomer: test metric vs own data (log scale), one line per option, 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(data)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, (newcomer, by_option) in zip(axes[0], sorted(data.items()), strict=True):
        for option in OPTIONS:
            points = sorted(by_option.get(option, {}).items())
            if not points:
                continue
            ks = [k for k, _ in points]
            stats_ = [_interval(list(v.values())) for _, v in points]
            means = [m for m, _ in stats_]
            halves = [0.0 if math.isnan(h) else h for _, h in stats_]
            ax.errorbar(ks, means, yerr=halves, marker="o", capsize=3, label=option)
        ax.set_xscale("log")
        ax.set_xticks(sorted({k for o in by_option.values() for k in o}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("own train data (% of the market's, first by time)")
        ax.set_ylabel(f"test {metric}")
        ax.set_title(f"newcomer: {newcomer}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
