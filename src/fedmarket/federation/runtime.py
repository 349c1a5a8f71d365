"""The in-process runtime: deterministic given a seed, no extra processes.

Each round: select markets (``client_fraction``), send each its download, let it train, check every
upload against the method's `UploadDeclaration` (and for NaN/Inf and shape changes), aggregate the
accepted updates, then evaluate every market on validation. Bytes are counted per market per round in
both directions. A market that raises (or uploads something invalid) is recorded and left out of that
round; the others go on. After each round the whole state is checkpointed, so ``run(resume=True)``
continues a killed run to the same final numbers: all randomness inside a round is derived from
(seed, market, round), never from a global generator that a restart would reset.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fedmarket.checkpoint import load_state, save_state
from fedmarket.data.split import market_seed
from fedmarket.errors import FedmarketError
from fedmarket.eval.metrics import lower_is_better
from fedmarket.federation.core import ClientTrainer, RoundConfig, Strategy, Update
from fedmarket.federation.payload import (
    UploadDeclaration,
    check_not_replayed,
    payload_bytes,
    validate_num_examples,
    validate_update,
)

log = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    test: dict[str, dict[str, float]]  # market -> metric -> value (selected model)
    history: list[dict[str, Any]]  # one row per (round, market): valid metrics and bytes
    communication: dict[str, dict[str, int]]  # market -> up_bytes, down_bytes, rounds
    failures: list[dict[str, Any]]
    selected_round: dict[str, int]
    uploads: list[dict[str, Any]] = field(default_factory=list)  # audit: keys, shapes, bytes per upload
    # privacy wrappers' record (ε per round, secure-aggregation rounds, server-step kind); {} without them
    privacy: dict[str, Any] = field(default_factory=dict)
    # early stopping (`Plateau`): rounds run, the round it converged, phase ends; {} without train.patience
    convergence: dict[str, Any] = field(default_factory=dict)
    # phased strategies: at each phase end, the test metrics of each market's best round so far (the run
    # stopped there): phase 1 of FeCoSR / FedAvg + fine-tune is the pre-trained model without fine-tuning.
    # [{"round": r, "test": market -> metric -> value, "selected_round": market -> round}] (both runtimes)
    phase_tests: list[dict[str, Any]] = field(default_factory=list)
    # seconds this seed had run before a resume (from its checkpoint); 0 for an uninterrupted run
    elapsed_before: float = 0.0


# ------------------------------------------------------------------ round bookkeeping shared by runtimes
# Pure functions, so the in-process `Simulator` and the Flower ServerApp (`fedmarket.flower.server`) select
# markets and rounds identically.
def select_markets(
    names: list[str],
    seed: int,
    server_round: int,
    client_fraction: float,
    min_markets: int,
    draws: dict[int, list[str]] | None = None,
) -> list[str]:
    """The markets that train in ``server_round``: all of them, or a ``client_fraction`` sample (never fewer
    than ``min_markets``). Without ``draws`` the sample is seeded by (seed, round) only, so a resumed run
    draws the same, and anyone who knows the config can predict it. With ``draws`` (secret sampling, for
    privacy amplification) it comes from OS randomness and is recorded there, so a resumed run replays it."""
    k = max(min(min_markets, len(names)), math.ceil(client_fraction * len(names)))
    if k >= len(names):
        return list(names)
    if draws is not None:
        if server_round not in draws:
            rng = np.random.default_rng(secrets.randbits(128))
            picked = set(rng.choice(len(names), size=k, replace=False).tolist())
            draws[server_round] = [n for i, n in enumerate(names) if i in picked]
        return list(draws[server_round])
    rng = np.random.default_rng(market_seed(seed, "__server__", server_round))
    chosen = set(rng.choice(len(names), size=k, replace=False).tolist())
    return [n for i, n in enumerate(names) if i in chosen]


def selection_score(metrics: dict[str, dict[str, float]], select_metric: str) -> float:
    """The validation score a trainer's round is selected by (mean over the markets it reports)."""
    values = [v[select_metric] for v in metrics.values() if select_metric in v]
    return float(np.nanmean(values)) if values else float("nan")


def improves(previous: float | None, score: float, select_metric: str) -> bool:
    """Whether ``score`` beats the best so far (``None``: no round yet). A round without the metric (NaN,
    e.g. a pre-training phase) never beats a round with it."""
    if previous is None:
        return True
    if np.isnan(score):
        return False
    if np.isnan(previous):
        return True
    return score < previous if lower_is_better(select_metric) else score > previous


@dataclass
class Plateau:
    """Early stopping on the validation score (mean of ``select_metric`` over the markets of a round).

    ``patience`` = 0 switches it off. A round improves when it beats the best so far by more than
    ``min_delta``; after ``patience`` evaluated rounds without improvement the run has converged. A strategy
    with phases (e.g. FedAvg then local fine-tuning) may take the plateau as the end of a phase instead of the
    run: its ``on_plateau(server_round)`` returns True, and counting starts again; its optional
    ``plateau_markets(server_round)`` narrows the score to some markets (one-to-one transfer's source phase:
    the source alone). While the strategy's ``in_first_phase(server_round)`` is true, ``phase_patience``
    (when not None) replaces ``patience``: 0 runs the first phase to its last round. The first phase's last
    round (its maximum, ``federated_rounds``) ends the phase as a plateau does, so every phased run records
    where its first phase ended. ``stop_slope`` (when not None) guards against stopping on noise while the
    score still rises: patience alone no longer stops; the least-squares slope of the phase's last
    ``slope_window`` validation scores (per round, signed so that improvement is positive) must also be at
    most ``stop_slope``, and the phase must have at least ``slope_window`` evaluated rounds. Pure bookkeeping
    shared by the in-process `Simulator` and the Flower ServerApp, checkpointed as a plain dict.
    """

    patience: int = 0
    min_delta: float = 0.0
    select_metric: str = "auc"
    best: float | None = None
    since: int = 0
    converged_round: int | None = None
    phase_ends: list[int] = field(default_factory=list)
    phase_patience: int | None = None
    stop_slope: float | None = None
    slope_window: int = 20
    # (round, score) of the current phase's evaluated rounds, for the slope guard
    scores: list[tuple[int, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "since": self.since,
            "converged_round": self.converged_round,
            "phase_ends": list(self.phase_ends),
            "scores": [list(x) for x in self.scores],
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        for key, value in (state or {}).items():
            if key == "phase_ends":
                value = list(value)
            elif key == "scores":
                value = [(int(r), float(v)) for r, v in value]
            setattr(self, key, value)

    def slope(self) -> float | None:
        """Improvement per round over the phase's last ``slope_window`` evaluated rounds (None: too few)."""
        if len(self.scores) < max(2, self.slope_window):
            return None
        window = np.asarray(self.scores[-self.slope_window :], dtype=float)
        slope = float(np.polyfit(window[:, 0], window[:, 1], 1)[0])
        if (
            abs(slope) < 1e-12
        ):  # a flat window: polyfit leaves ~1e-17 of either sign, which `stop_slope: 0` must not see
            return 0.0
        return -slope if lower_is_better(self.select_metric) else slope

    def update(self, server_round: int, history: list[dict[str, Any]], strategy: Any) -> bool:
        """Record round ``server_round``'s validation rows; True when the run should stop after it."""
        if self.patience <= 0:
            return False
        phase = getattr(strategy, "in_first_phase", None)
        first = bool(phase is not None and phase(server_round))
        limit = self.phase_patience if first and self.phase_patience is not None else self.patience
        scope = getattr(strategy, "plateau_markets", None)
        markets = scope(server_round) if scope is not None else None
        values = [
            h[self.select_metric]
            for h in history
            if h.get("round") == server_round
            and h.get("split", "valid") == "valid"
            and self.select_metric in h
            and (markets is None or h.get("market") in markets)
        ]
        # not an evaluated round (eval.every) or a phase without the metric: nothing to count
        evaluated = bool(values) and not np.all(np.isnan(values))
        if evaluated:
            score = float(np.nanmean(values))
            lower = lower_is_better(self.select_metric)
            gain = None if self.best is None else (self.best - score if lower else score - self.best)
            if gain is None or gain > self.min_delta:
                self.best, self.since = score, 0
            else:
                self.since += 1
            self.scores.append((server_round, score))
        maximum = getattr(strategy, "federated_rounds", None)
        last_of_phase = first and maximum is not None and server_round >= maximum
        if not last_of_phase and (not evaluated or limit <= 0 or self.since < limit):
            return False
        if not last_of_phase and self.stop_slope is not None:
            slope = self.slope()
            if slope is None or slope > self.stop_slope:
                return False  # patience ran out, but the score is still rising (or too few rounds to tell)
        hook = getattr(strategy, "on_plateau", None)
        if hook is not None and hook(server_round):
            self.phase_ends.append(server_round)
            self.best, self.since, self.scores = None, 0, []
            return False
        self.converged_round = server_round
        return True


class Simulator:
    def __init__(
        self,
        trainers: dict[str, ClientTrainer],
        strategy: Strategy,
        declaration: UploadDeclaration,
        *,
        rounds: int,
        local_epochs: int = 1,
        seed: int = 0,
        client_fraction: float = 1.0,
        min_markets: int = 1,
        secret_sampling: bool = False,
        max_examples: int = 1_000_000_000,
        eval_every: int = 1,
        select: str = "best_valid",
        select_metric: str = "auc",
        full_ranking: bool = True,
        checkpoint_path: str | Path | None = None,
        checkpoint_fallback: bool = False,
        progress: bool = True,
        patience: int = 0,
        min_delta: float = 0.0,
        phase_patience: int | None = None,
        stop_slope: float | None = None,
        slope_window: int = 20,
    ) -> None:
        if not trainers:
            raise FedmarketError("no markets to train")
        self.trainers = trainers
        self.strategy = strategy
        self.declaration = declaration
        self.rounds = rounds
        self.local_epochs = local_epochs
        self.seed = seed
        self.client_fraction = client_fraction
        self.max_examples = max_examples
        self.upload_digests: dict[str, str] = {}  # market -> digest of its last upload (replay check)
        # secret sampling: each round's draw from OS randomness, kept here (and in the checkpoint) for resume
        self.draws: dict[int, list[str]] | None = {} if secret_sampling else None
        self.min_markets = min(min_markets, len(trainers))
        self.eval_every = eval_every
        self.select = select
        self.select_metric = select_metric
        self.full_ranking = full_ranking
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.checkpoint_fallback = checkpoint_fallback
        self.elapsed_before = 0.0  # seconds of this seed before a resume
        self._started = time.perf_counter()
        self.progress = progress
        # mutable run state (checkpointed)
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.uploads: list[dict[str, Any]] = []
        self.communication = {m: {"up_bytes": 0, "down_bytes": 0, "rounds": 0} for m in trainers}
        self.best: dict[str, dict[str, Any]] = {}
        self.plateau = Plateau(
            patience,
            min_delta,
            select_metric,
            phase_patience=phase_patience,
            stop_slope=stop_slope,
            slope_window=slope_window,
        )
        self.phase_tests: list[dict[str, Any]] = []

    # ----------------------------------------------------------------- state
    def _state(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "strategy": self.strategy.state_dict(),
            "trainers": {m: t.state_dict() for m, t in self.trainers.items()},
            "history": self.history,
            "failures": self.failures,
            "uploads": self.uploads,
            "communication": self.communication,
            "best": self.best,
            "plateau": self.plateau.state_dict(),
            "phase_tests": self.phase_tests,
            "draws": self.draws,
            "upload_digests": self.upload_digests,
            "elapsed": self.elapsed_before + (time.perf_counter() - self._started),
        }

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        save_state(self.checkpoint_path, self._state())  # atomic, checksummed, the previous one kept

    def load_checkpoint(self) -> bool:
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return False
        state = load_state(self.checkpoint_path, fallback=self.checkpoint_fallback)
        if set(state["trainers"]) != set(self.trainers):
            raise FedmarketError(
                f"checkpoint {self.checkpoint_path} holds markets {sorted(state['trainers'])}, "
                f"this run has {sorted(self.trainers)}"
            )
        self.round = state["round"]
        self.strategy.load_state_dict(state["strategy"])
        for m, t in self.trainers.items():
            t.load_state_dict(state["trainers"][m])
        self.history = state["history"]
        self.failures = state["failures"]
        self.uploads = state.get("uploads", [])
        self.communication = state["communication"]
        self.best = state["best"]
        self.plateau.load_state_dict(state.get("plateau"))
        self.phase_tests = state.get("phase_tests", [])
        if self.draws is not None:
            self.draws = {int(r): list(d) for r, d in (state.get("draws") or {}).items()}
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.upload_digests = dict(state.get("upload_digests") or {})
        return True

    # ----------------------------------------------------------------- rounds
    def _select_markets(self, server_round: int) -> list[str]:
        return select_markets(
            list(self.trainers), self.seed, server_round, self.client_fraction, self.min_markets, self.draws
        )

    def _fail(self, server_round: int, market: str, stage: str, exc: BaseException) -> None:
        msg = f"{type(exc).__name__}: {exc}"
        log.warning("round %d: market %s failed in %s: %s", server_round, market, stage, msg)
        self.failures.append(
            {
                "seed": self.seed,
                "round": server_round,
                "market": market,
                "stage": stage,
                "error": msg,
                "traceback": traceback.format_exc(limit=5),
            }
        )

    def run_round(self, server_round: int) -> None:
        selected = self._select_markets(server_round)
        downloads = self.strategy.configure_train(server_round, selected)
        options = self.strategy.round_options(server_round)
        updates: dict[str, Update] = {}
        for market in selected:
            down = downloads.get(market, {})
            self.communication[market]["down_bytes"] += payload_bytes(down)
            cfg = RoundConfig(server_round, self.local_epochs, self.seed, options)
            try:
                update = self.trainers[market].fit(down, cfg)
                self.declaration.check(update.payload, market)
                metrics = self.declaration.check_metrics(update.metrics, market, "training metric")
                count = validate_num_examples(
                    update.num_examples, market, self.max_examples, uploaded=bool(update.payload)
                )
                update = Update(update.payload, count, metrics)
                validate_update(update.payload, down if down else None, market)
                check_not_replayed(update.payload, market, self.upload_digests)
            except Exception as exc:  # a failing market must not stop the others
                self._fail(server_round, market, "fit", exc)
                continue
            up = payload_bytes(update.payload)
            self.communication[market]["up_bytes"] += up
            self.communication[market]["rounds"] += 1
            self.uploads.append(
                {
                    "seed": self.seed,
                    "round": server_round,
                    "market": market,
                    "bytes": up,
                    "down_bytes": payload_bytes(down),
                    "keys": {k: list(np.shape(v)) for k, v in update.payload.items()},
                }
            )
            updates[market] = update
        if len(updates) < self.min_markets:
            raise FedmarketError(
                f"round {server_round}: only {len(updates)} market(s) succeeded, fewer than train.min_markets="
                f"{self.min_markets}; failures: {[f['market'] for f in self.failures if f['round'] == server_round]}"
            )
        self.strategy.aggregate_train(server_round, updates)
        if server_round % self.eval_every == 0 or server_round == self.rounds:
            self._evaluate_round(server_round, updates)

    def _declared(self, by_market: dict[str, dict[str, float]], where: str) -> dict[str, dict[str, float]]:
        """A trainer's metrics per market, each checked against the declaration (`check_metrics`)."""
        return {m: self.declaration.check_metrics(v, m, where) for m, v in by_market.items()}

    def _round_metrics(self, server_round: int) -> dict[str, float]:
        """Server-side per-round columns for rounds.csv (e.g. ε from `fedmarket.federation.privacy`)."""
        hook = getattr(self.strategy, "round_metrics", None)
        return dict(hook(server_round)) if hook is not None else {}

    def _evaluate_round(self, server_round: int, updates: dict[str, Update]) -> None:
        eval_payloads = self.strategy.configure_evaluate(server_round, list(self.trainers))
        for name, trainer in self.trainers.items():
            try:
                metrics = self._declared(
                    trainer.evaluate(eval_payloads.get(name), "valid"), "validation metric"
                )
            except Exception as exc:
                self._fail(server_round, name, "evaluate", exc)
                continue
            extra = self._round_metrics(server_round)
            for market, values in metrics.items():
                row = {"seed": self.seed, "round": server_round, "market": market, "split": "valid", **values}
                row.update(extra)
                if name in updates:
                    row.update({f"train_{k}": v for k, v in updates[name].metrics.items()})
                self.history.append(row)
            score = selection_score(metrics, self.select_metric)
            prev = self.best.get(name)
            if self.select == "last" or improves(prev["score"] if prev else None, score, self.select_metric):
                self.best[name] = {
                    "score": score,
                    "round": server_round,
                    "state": copy.deepcopy(trainer.state_dict()),
                }

    def run(self, resume: bool = False) -> SimulationResult:
        self._started = time.perf_counter()
        if resume and self.load_checkpoint():
            log.info("resumed from %s at round %d", self.checkpoint_path, self.round)
        else:
            initial = next(iter(self.trainers.values())).initial_payload()
            self.strategy.initialize(initial)
        bar = tqdm(
            range(self.round + 1, self.rounds + 1),
            desc="rounds",
            initial=self.round,
            total=self.rounds,
            disable=not self.progress,
            leave=False,
        )
        stop_before = getattr(self.strategy, "stop_before", None)  # e.g. a privacy budget (target ε)
        for server_round in bar:
            if self.plateau.converged_round is not None:
                break  # resumed after convergence
            if stop_before is not None and stop_before(server_round):
                log.info("stopping before round %d (the strategy's stop condition)", server_round)
                break
            t0 = time.perf_counter()
            self.run_round(server_round)
            self.round = server_round
            ends = len(self.plateau.phase_ends)
            converged = self.plateau.update(server_round, self.history, self.strategy)
            if len(self.plateau.phase_ends) > ends:
                self.phase_tests.append(self.test_best(server_round))
            self.save_checkpoint()
            recent = [
                h[self.select_metric]
                for h in self.history
                if h["round"] == server_round and self.select_metric in h
            ]
            if recent:
                bar.set_postfix(
                    {
                        f"valid_{self.select_metric}": f"{np.nanmean(recent):.4f}",
                        "s": f"{time.perf_counter() - t0:.1f}",
                    }
                )
            if converged:
                log.info(
                    "converged: no validation gain > %g for %d rounds; stopping after round %d",
                    self.plateau.min_delta,
                    self.plateau.patience,
                    server_round,
                )
                break
        bar.close()
        return self.finish()

    def _test_selected(self, server_round: int) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
        """Load each market's best state and evaluate it on test (the trainers keep the best states)."""
        test: dict[str, dict[str, float]] = {}
        selected: dict[str, int] = {}
        for name, trainer in self.trainers.items():
            best = self.best.get(name)
            if best is not None:
                trainer.load_state_dict(copy.deepcopy(best["state"]))
                selected[name] = best["round"]
            try:
                test.update(
                    self._declared(
                        trainer.evaluate(None, "test", full_ranking=self.full_ranking), "test metric"
                    )
                )
            except Exception as exc:
                self._fail(server_round, name, "test", exc)
        return test, selected

    def test_best(self, server_round: int) -> dict[str, Any]:
        """What the run would report had it stopped after ``server_round`` (a phase end): each market's best
        round so far on test. The trainers' current states are restored afterwards, so training continues
        exactly as without this evaluation."""
        current = {name: copy.deepcopy(t.state_dict()) for name, t in self.trainers.items()}
        try:
            test, selected = self._test_selected(server_round)
        finally:
            for name, trainer in self.trainers.items():
                trainer.load_state_dict(current[name])
        return {"round": server_round, "test": test, "selected_round": selected}

    def finish(self) -> SimulationResult:
        test, selected = self._test_selected(self.round)
        return SimulationResult(
            test=test,
            history=self.history,
            communication=self.communication,
            failures=self.failures,
            selected_round=selected,
            uploads=self.uploads,
            privacy=dict(getattr(self.strategy, "privacy_report", dict)()),
            convergence=convergence_report(self.plateau, self.round),
            phase_tests=self.phase_tests,
            elapsed_before=self.elapsed_before,
        )

    def save_selected_models(self, folder: str | Path) -> list[Path]:
        """Write each market's model at its selected round (``models/seed<N>/<market>.safetensors``, for
        serving). Call after `finish`: the trainers then hold their best states (kept in ``self.best``
        whenever validation improved), so no second copy of the weights is needed."""
        from fedmarket.serving.models import write_selected_models

        selected = {name: int(best["round"]) for name, best in self.best.items()}
        return write_selected_models(self.trainers, selected, folder, self.seed)


def convergence_report(plateau: Plateau, rounds_run: int) -> dict[str, Any]:
    """What metrics.json says about early stopping ({} when ``train.patience`` is off)."""
    if plateau.patience <= 0:
        return {}
    return {
        "patience": plateau.patience,
        "min_delta": plateau.min_delta,
        "rounds_run": rounds_run,
        "converged_round": plateau.converged_round,
        "phase_ends": list(plateau.phase_ends),
        **({} if plateau.phase_patience is None else {"phase_patience": plateau.phase_patience}),
        **(
            {}
            if plateau.stop_slope is None
            else {"stop_slope": plateau.stop_slope, "slope_window": plateau.slope_window}
        ),
    }
