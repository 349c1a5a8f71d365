"""The one round driver: every runtime's round loop, and the ledger of what a run books.

A run is a sequence of rounds. Each round: select markets (``client_fraction``), ask the strategy what each
downloads, let the selected markets train, check every upload against the method's `UploadDeclaration` (and
for NaN/Inf, shape changes, replays, example counts), aggregate the accepted updates in market order (so the
float sums do not depend on arrival order), then evaluate every market on validation and keep each market's
best round. After the last round each market is tested at its selected round. Bytes are counted per market
per round in both directions. A market that raises, times out or uploads something invalid is recorded and
left out of that step; the round fails only below ``train.min_markets``. After each round the whole state is
checkpointed, so a killed run resumes to the same final numbers: all randomness inside a round is derived
from (seed, market, round), never from a global generator that a restart would reset.

`Driver` owns that loop and the `Ledger`; it reaches the markets through a `Transport`:

- in process (`fedmarket.federation.runtime.InProcessTransport`: serial calls, or worker processes that
  train markets in parallel, bit-identical to serial),
- Flower's ``Grid`` (`fedmarket.flower.server.FlowerTransport`: simulation and the Deployment Engine), where
  secure aggregation (Flower's SecAgg+) is a capability of the transport.

The strategy contract it relies on is `fedmarket.federation.core.Strategy` (phases, step kind, round
metrics, stop condition, privacy report: real methods with defaults, no attribute look-ups).
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fedmarket.checkpoint import load_state, save_state
from fedmarket.data.split import market_seed
from fedmarket.errors import FedmarketError
from fedmarket.eval.metrics import lower_is_better
from fedmarket.federation.core import MarketMetrics, RoundConfig, Strategy, Update
from fedmarket.federation.payload import (
    Payload,
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
    # [{"round": r, "test": market -> metric -> value, "selected_round": market -> round}]
    phase_tests: list[dict[str, Any]] = field(default_factory=list)
    # seconds this seed had run before a resume (from its checkpoint); 0 for an uninterrupted run
    elapsed_before: float = 0.0
    # per round with a secure-aggregation capable transport: secured or in the clear, and why
    secure_aggregation: list[dict[str, Any]] = field(default_factory=list)
    # who took part in which round: [{"round", "markets" (present), "trained" (uploaded), "joined", "left"}]
    participation: list[dict[str, Any]] = field(default_factory=list)
    joined: dict[str, int] = field(default_factory=dict)  # market -> the round it joined (1: from the start)


# ------------------------------------------------------------------ pure round bookkeeping
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
    run: its ``on_plateau(server_round)`` returns True, and counting starts again; its
    ``plateau_markets(server_round)`` narrows the score to some markets (one-to-one transfer's source phase:
    the source alone). While the strategy's ``in_first_phase(server_round)`` is true, ``phase_patience``
    (when not None) replaces ``patience``: 0 runs the first phase to its last round. The first phase's last
    round (``first_phase_limit()``) ends the phase as a plateau does, so every phased run records where its
    first phase ended. ``stop_slope`` (when not None) guards against stopping on noise while the score still
    rises: patience alone no longer stops; the least-squares slope of the phase's last ``slope_window``
    validation scores (per round, signed so that improvement is positive) must also be at most
    ``stop_slope``, and the phase must have at least ``slope_window`` evaluated rounds. Checkpointed as a
    plain dict.
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

    def update(self, server_round: int, history: list[dict[str, Any]], strategy: Strategy | None) -> bool:
        """Record round ``server_round``'s validation rows; True when the run should stop after it (``strategy``
        None: a run without phases)."""
        if self.patience <= 0:
            return False
        strategy = strategy if strategy is not None else _NO_PHASES
        first = strategy.in_first_phase(server_round)
        limit = self.phase_patience if first and self.phase_patience is not None else self.patience
        markets = strategy.plateau_markets(server_round)
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
        maximum = strategy.first_phase_limit()
        last_of_phase = first and maximum is not None and server_round >= maximum
        if not last_of_phase and (not evaluated or limit <= 0 or self.since < limit):
            return False
        if not last_of_phase and self.stop_slope is not None:
            slope = self.slope()
            if slope is None or slope > self.stop_slope:
                return False  # patience ran out, but the score is still rising (or too few rounds to tell)
        if strategy.on_plateau(server_round):
            self.phase_ends.append(server_round)
            self.best, self.since, self.scores = None, 0, []
            return False
        self.converged_round = server_round
        return True


class _NoPhases(Strategy):
    """The contract's defaults alone: what `Plateau.update` consults when given no strategy."""

    def initialize(self, initial: Payload) -> None:
        return None

    def configure_train(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        return {}

    def aggregate_train(self, server_round: int, updates: dict[str, Update]) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


_NO_PHASES = _NoPhases()


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


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class DriverSettings:
    """Everything the round loop reads from an experiment config (`from_config`)."""

    rounds: int
    local_epochs: int = 1
    seed: int = 0
    client_fraction: float = 1.0
    min_markets: int = 1
    secret_sampling: bool = False
    max_examples: int = 1_000_000_000
    eval_every: int = 1
    select: str = "best_valid"
    select_metric: str = "auc"
    full_ranking: bool = True
    patience: int = 0
    min_delta: float = 0.0
    phase_patience: int | None = None
    stop_slope: float | None = None
    slope_window: int = 20
    # late join and leave (`train.join`, `train.leave`): market -> first / last round it takes part in
    join: dict[str, int] = field(default_factory=dict)
    leave: dict[str, int] = field(default_factory=dict)

    def present(self, market: str, server_round: int) -> bool:
        """Whether ``market`` takes part in ``server_round`` (joined, not left)."""
        return self.join.get(market, 1) <= server_round <= self.leave.get(market, self.rounds)

    @classmethod
    def from_config(cls, cfg: Any, seed: int) -> DriverSettings:
        t, e = cfg.train, cfg.eval
        return cls(
            rounds=t.rounds,
            local_epochs=t.local_epochs,
            seed=seed,
            client_fraction=t.client_fraction,
            min_markets=t.min_markets,
            secret_sampling=cfg.privacy.mode != "off" and cfg.privacy.secret_sampling,
            max_examples=t.max_examples,
            eval_every=e.every,
            select=e.select,
            select_metric=e.select_metric,
            full_ranking=e.full_ranking,
            patience=t.patience,
            min_delta=t.min_delta,
            phase_patience=t.phase_patience,
            stop_slope=t.stop_slope,
            slope_window=t.slope_window,
            join=dict(t.join),
            leave=dict(t.leave),
        )


# ------------------------------------------------------------------ the transport contract
@dataclass
class TrainRequest:
    """What one selected market is sent in a round."""

    download: Payload
    config: RoundConfig
    keep_round: int  # the market's best round so far (a market that keeps snapshots keeps that one)
    # the keys and shapes the market may upload (`Strategy.upload_contract`; empty: no download to check against)
    contract: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class Reply:
    """A market's answer to a train request, as received (checked by the driver unless ``secured``)."""

    payload: Payload
    num_examples: Any
    metrics: dict[str, Any]
    # through secure aggregation: ``payload`` is the aggregate, the market made the checks before masking
    secured: bool = False


@dataclass
class Failure:
    """A market that did not answer a request usefully (raised, timed out, had no node...)."""

    error: str
    traceback: str = ""


@dataclass
class TrainOutcome:
    replies: dict[str, Reply | Failure]
    # transports with secure aggregation: this round's record (secure or not, why, ...); None otherwise
    secure: dict[str, Any] | None = None


class Transport(ABC):
    """How the driver reaches the markets. ``markets`` is the fixed order every step iterates in (the
    names a step's replies are keyed by: one per trainer, which may report several markets' metrics)."""

    markets: list[str]
    # whether `train` may run a sum step through a secure-aggregation protocol (it then needs `step`)
    secure_aggregation: bool = False

    @abstractmethod
    def open(self, seed: int, want_initial: bool) -> Payload | None:
        """Connect to the markets (set ``markets``); with ``want_initial``, the first market's initial shared
        parameters, which the strategy starts from."""

    def refresh(self, seed: int) -> None:
        """Before each round: pick up markets that (re)connected. Default: nothing."""
        return None

    @abstractmethod
    def train(
        self,
        seed: int,
        server_round: int,
        requests: dict[str, TrainRequest],
        step: tuple[bool, str] | None = None,
    ) -> TrainOutcome:
        """Send each selected market its request; one reply or failure per market. ``step``: the strategy's
        `step_kind` of this round (only for a transport with ``secure_aggregation``)."""

    @abstractmethod
    def evaluate(
        self, seed: int, server_round: int, payloads: dict[str, Payload | None], best: dict[str, dict]
    ) -> dict[str, MarketMetrics | Failure]:
        """Every market evaluates on validation after loading its payload; ``best``: the ledger's best
        rounds before this one (what a market that keeps snapshots keeps)."""

    def keep(self, name: str) -> dict[str, Any]:
        """What the ledger keeps with a market's new best round besides its score and round (in process: a
        copy of the trainer's state; a remote market keeps its own snapshot). Default: nothing."""
        return {}

    @abstractmethod
    def test(
        self, seed: int, server_round: int, best: dict[str, dict], full_ranking: bool, final: bool
    ) -> dict[str, MarketMetrics | Failure]:
        """Every market tests its best round so far. ``final``: the run's last test (an in-process trainer
        then keeps its best state loaded, for export); else a phase end, after which training goes on
        exactly as without the test."""

    def round_done(self, seed: int, server_round: int, seconds: float) -> None:
        """After each round (timings, progress files). Default: nothing."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the transport (in process: the trainers' states)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`'s keys from a checkpoint (before `open`)."""
        return None

    def close(self) -> None:
        """Release workers or connections."""
        return None


# ------------------------------------------------------------------ the ledger
@dataclass
class Ledger:
    """What a run books round by round; checkpointed whole (``state_dict``)."""

    seed: int = 0
    round: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    communication: dict[str, dict[str, int]] = field(default_factory=dict)
    best: dict[str, dict[str, Any]] = field(default_factory=dict)
    phase_tests: list[dict[str, Any]] = field(default_factory=list)
    upload_digests: dict[str, str] = field(default_factory=dict)  # market -> digest of its last upload
    draws: dict[int, list[str]] | None = None  # secret sampling: each round's draw (replayed on resume)
    secure_aggregation: list[dict[str, Any]] = field(default_factory=list)
    joined: dict[str, int] = field(default_factory=dict)  # market -> the round it took part first
    participation: list[dict[str, Any]] = field(default_factory=list)

    KEYS = (
        "round",
        "history",
        "failures",
        "uploads",
        "communication",
        "best",
        "phase_tests",
        "upload_digests",
        "draws",
        "secure_aggregation",
        "joined",
        "participation",
    )

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in self.KEYS:
            if key not in state or state[key] is None:
                continue  # older checkpoints lack newer keys
            value = state[key]
            if key == "draws":
                if self.draws is None:
                    continue  # this run draws publicly
                value = {int(r): list(d) for r, d in value.items()}
            setattr(self, key, value)

    def fail(self, server_round: int, market: str, stage: str, error: str, tb: str = "") -> None:
        log.warning("round %d: market %s failed in %s: %s", server_round, market, stage, error)
        self.failures.append(
            {
                "seed": self.seed,
                "round": server_round,
                "market": market,
                "stage": stage,
                "error": error,
                "traceback": tb,
            }
        )

    def book_upload(self, server_round: int, market: str, payload: Payload, down: Payload) -> None:
        up = payload_bytes(payload)
        self.communication[market]["up_bytes"] += up
        self.communication[market]["rounds"] += 1
        self.uploads.append(
            {
                "seed": self.seed,
                "round": server_round,
                "market": market,
                "bytes": up,
                "down_bytes": payload_bytes(down),
                "keys": {k: list(np.shape(v)) for k, v in payload.items()},
            }
        )


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------ the driver
class Driver:
    """Runs one seed of a method over a `Transport` (see the module doc)."""

    def __init__(
        self,
        transport: Transport,
        strategy: Strategy,
        declaration: UploadDeclaration,
        settings: DriverSettings,
        *,
        checkpoint_path: str | Path | None = None,
        checkpoint_fallback: bool = False,
        progress: bool = True,
    ) -> None:
        self.transport = transport
        self.strategy = strategy
        self.declaration = declaration
        self.settings = settings
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.checkpoint_fallback = checkpoint_fallback
        self.progress = progress
        self.ledger = Ledger(seed=settings.seed, draws={} if settings.secret_sampling else None)
        self.plateau = Plateau(
            settings.patience,
            settings.min_delta,
            settings.select_metric,
            phase_patience=settings.phase_patience,
            stop_slope=settings.stop_slope,
            slope_window=settings.slope_window,
        )
        self.elapsed_before = 0.0  # seconds of this seed before a resume
        self._started = time.perf_counter()
        self.min_markets = settings.min_markets

    # ----------------------------------------------------------------- ledger views (read by tests, reports)
    @property
    def history(self) -> list[dict[str, Any]]:
        return self.ledger.history

    @property
    def failures(self) -> list[dict[str, Any]]:
        return self.ledger.failures

    @property
    def round(self) -> int:
        return self.ledger.round

    @property
    def draws(self) -> dict[int, list[str]] | None:
        return self.ledger.draws

    @property
    def uploads(self) -> list[dict[str, Any]]:
        return self.ledger.uploads

    @property
    def communication(self) -> dict[str, dict[str, int]]:
        return self.ledger.communication

    @property
    def best(self) -> dict[str, dict[str, Any]]:
        return self.ledger.best

    # ----------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            **self.ledger.state_dict(),
            **self.transport.state_dict(),
            "strategy": self.strategy.state_dict(),
            "plateau": self.plateau.state_dict(),
            "elapsed": self.elapsed_before + (time.perf_counter() - self._started),
        }

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is not None:
            save_state(self.checkpoint_path, self._state())  # atomic, checksummed, the previous one kept

    def load_checkpoint(self) -> bool:
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            return False
        state = load_state(self.checkpoint_path, fallback=self.checkpoint_fallback)
        self.transport.load_state_dict(state)
        self.strategy.load_state_dict(state["strategy"])
        self.ledger.load_state_dict(state)
        self.plateau.load_state_dict(state.get("plateau"))
        self.elapsed_before = float(state.get("elapsed", 0.0))
        return True

    # ----------------------------------------------------------------- who takes part
    def present(self, server_round: int) -> list[str]:
        """The markets taking part in ``server_round`` (joined, not left), in market order."""
        return [
            m
            for m in self.transport.markets
            if m in self.ledger.joined and self.settings.present(m, server_round)
        ]

    def admit(self, server_round: int) -> None:
        """Markets whose join round has come (in process: by ``train.join``; on Flower also: whose node has
        connected) take part from ``server_round`` on. A market joining a running federation (round > 1) is
        announced to the strategy (`Strategy.admit`), which decides what a newcomer downloads first."""
        for market in self.transport.markets:
            if market in self.ledger.joined or not self.settings.present(market, server_round):
                continue
            self.ledger.joined[market] = server_round
            self.ledger.communication.setdefault(market, {"up_bytes": 0, "down_bytes": 0, "rounds": 0})
            if server_round > 1:
                log.info("round %d: market %s joins the federation", server_round, market)
                self.strategy.admit(market, server_round)

    # ----------------------------------------------------------------- one round
    def run_round(self, server_round: int) -> None:
        s, ledger, transport = self.settings, self.ledger, self.transport
        present = self.present(server_round)
        selected = select_markets(
            present, s.seed, server_round, s.client_fraction, self.min_markets, ledger.draws
        )
        downloads = self.strategy.configure_train(server_round, selected)
        options = self.strategy.round_options(server_round)
        requests: dict[str, TrainRequest] = {}
        for market in selected:
            down = downloads.get(market, {})
            ledger.communication[market]["down_bytes"] += payload_bytes(down)
            best = ledger.best.get(market)
            requests[market] = TrainRequest(
                down,
                RoundConfig(server_round, s.local_epochs, s.seed, dict(options)),
                best["round"] if best else 0,
                self.strategy.upload_contract(server_round, down) if down else {},
            )
        step = self.strategy.step_kind(server_round) if transport.secure_aggregation else None
        outcome = transport.train(s.seed, server_round, requests, step)
        if outcome.secure is not None and not outcome.secure.get("secure"):
            ledger.secure_aggregation.append({"round": server_round, **outcome.secure})
        updates: dict[str, Update] = {}
        for market in selected:  # market order, not arrival order: the aggregate's float sums depend on it
            reply = outcome.replies.get(market)
            if reply is None:
                continue
            if isinstance(reply, Failure):
                ledger.fail(server_round, market, "fit", reply.error, reply.traceback)
                continue
            down = downloads.get(market, {})
            if reply.secured:  # the aggregate itself; the market checked its own upload before masking
                metrics = {k: float(v) for k, v in reply.metrics.items()}
                update = Update(reply.payload, int(reply.num_examples), metrics)
            else:
                try:
                    update = self._checked(market, reply, requests[market].contract)
                except Exception as exc:
                    ledger.fail(server_round, market, "fit", _error_text(exc))
                    continue
            ledger.book_upload(server_round, market, update.payload, down)
            updates[market] = update
        ledger.participation.append(
            {
                "round": server_round,
                "markets": present,
                "trained": list(updates),
                "joined": [m for m in present if ledger.joined.get(m) == server_round and server_round > 1],
                "left": [m for m in ledger.joined if s.leave.get(m) == server_round - 1],
            }
        )
        if len(updates) < self.min_markets:
            failed = [
                f"{f['market']} ({f['stage']}: {f['error'][:120]})"
                for f in ledger.failures
                if f["round"] == server_round
            ]
            raise FedmarketError(
                f"round {server_round}: only {len(updates)} market(s) succeeded, fewer than train.min_markets="
                f"{self.min_markets}; failures: {'; '.join(failed) or 'none'}"
            )
        self.strategy.aggregate_train(server_round, updates)
        if outcome.secure is not None and outcome.secure.get("secure"):
            if any(u.payload for u in updates.values()):  # nothing left any market: nothing to protect
                ledger.secure_aggregation.append({"round": server_round, **outcome.secure})
        if server_round % s.eval_every == 0 or server_round == s.rounds:
            self._evaluate_round(server_round, updates)

    def _checked(self, market: str, reply: Reply, contract: dict[str, tuple[int, ...]]) -> Update:
        """A plain reply as an `Update`, after every check an upload must pass."""
        self.declaration.check(reply.payload, market)
        metrics = self.declaration.check_metrics(reply.metrics, market, "training metric")
        count = validate_num_examples(
            reply.num_examples, market, self.settings.max_examples, uploaded=bool(reply.payload)
        )
        validate_update(reply.payload, contract or None, market)
        check_not_replayed(reply.payload, market, self.ledger.upload_digests)
        return Update(reply.payload, count, metrics)

    def _declared(self, name: str, metrics: Any, where: str) -> dict[str, dict[str, float]]:
        """A market's metrics, each market's checked against the declaration in force."""
        if isinstance(metrics, Failure):
            raise FedmarketError(metrics.error)
        return {m: self.declaration.check_metrics(v, m, where) for m, v in metrics.items()}

    def _evaluate_round(self, server_round: int, updates: dict[str, Update]) -> None:
        s, ledger = self.settings, self.ledger
        names = self.present(server_round)
        payloads = self.strategy.configure_evaluate(server_round, names)
        payloads = {m: payloads.get(m) for m in names}  # markets that have not joined or have left: none
        results = self.transport.evaluate(s.seed, server_round, payloads, ledger.best)
        extra = dict(self.strategy.round_metrics(server_round))  # server-side columns, e.g. ε
        for name in names:
            if name not in results:
                continue
            reply = results[name]
            try:
                metrics = self._declared(name, reply, "validation metric")
            except Exception as exc:
                tb = reply.traceback if isinstance(reply, Failure) else ""
                ledger.fail(server_round, name, "evaluate", _text(reply, exc), tb)
                continue
            for market, values in metrics.items():
                row = {"seed": s.seed, "round": server_round, "market": market, "split": "valid", **values}
                row.update(extra)
                if name in updates:
                    row.update({f"train_{k}": v for k, v in updates[name].metrics.items()})
                ledger.history.append(row)
            score = selection_score(metrics, s.select_metric)
            prev = ledger.best.get(name)
            if s.select == "last" or improves(prev["score"] if prev else None, score, s.select_metric):
                ledger.best[name] = {"score": score, "round": server_round, **self.transport.keep(name)}

    def _test(self, server_round: int, final: bool) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
        s, ledger = self.settings, self.ledger
        results = self.transport.test(s.seed, server_round, ledger.best, s.full_ranking, final)
        test: dict[str, dict[str, float]] = {}
        for name in self.transport.markets:
            if name not in results or name not in ledger.joined:  # never took part: nothing to test
                continue
            reply = results[name]
            try:
                test.update(self._declared(name, reply, "test metric"))
            except Exception as exc:
                tb = reply.traceback if isinstance(reply, Failure) else ""
                ledger.fail(server_round, name, "test", _text(reply, exc), tb)
        return test, {m: int(b["round"]) for m, b in ledger.best.items()}

    def test_best(self, server_round: int) -> dict[str, Any]:
        """What the run would report had it stopped after ``server_round`` (a phase end): each market's best
        round so far on test; training then continues exactly as without this evaluation."""
        test, selected = self._test(server_round, final=False)
        return {"round": server_round, "test": test, "selected_round": selected}

    # ----------------------------------------------------------------- the run
    def run(self, resume: bool = False) -> SimulationResult:
        self._started = time.perf_counter()
        resumed = resume and self.load_checkpoint()
        if resumed:
            log.info("resumed from %s at round %d", self.checkpoint_path, self.ledger.round)
        initial = self.transport.open(self.settings.seed, want_initial=not resumed)
        if not self.transport.markets:
            raise FedmarketError("no markets to train")
        first = [m for m in self.transport.markets if self.settings.present(m, 1)]
        if not first:
            raise FedmarketError(
                f"no market takes part in round 1: train.join puts every market {self.transport.markets} later"
            )
        self.min_markets = min(self.settings.min_markets, len(first))
        if not resumed:
            self.strategy.initialize(initial)
            self.ledger.communication = {
                m: {"up_bytes": 0, "down_bytes": 0, "rounds": 0} for m in self.transport.markets
            }
        try:
            self._loop()
            self.transport.refresh(self.settings.seed)
            return self.finish()
        finally:
            self.transport.close()

    def _loop(self) -> None:
        s, ledger = self.settings, self.ledger
        bar = tqdm(
            range(ledger.round + 1, s.rounds + 1),
            desc="rounds",
            initial=ledger.round,
            total=s.rounds,
            disable=not self.progress,
            leave=False,
        )
        for server_round in bar:
            if self.plateau.converged_round is not None:
                break  # resumed after convergence
            if self.strategy.stop_before(server_round):  # e.g. a privacy budget (target ε)
                log.info("stopping before round %d (the strategy's stop condition)", server_round)
                break
            t0 = time.perf_counter()
            self.transport.refresh(s.seed)  # a (re)started market rejoins here; a new one appears
            self.admit(server_round)
            self.run_round(server_round)
            ledger.round = server_round
            ends = len(self.plateau.phase_ends)
            converged = self.plateau.update(server_round, ledger.history, self.strategy)
            if len(self.plateau.phase_ends) > ends:  # a phase ended: test the run as if it stopped here
                ledger.phase_tests.append(self.test_best(server_round))
            self.save_checkpoint()
            seconds = time.perf_counter() - t0
            self.transport.round_done(s.seed, server_round, seconds)
            recent = [
                h[s.select_metric]
                for h in ledger.history
                if h["round"] == server_round and s.select_metric in h
            ]
            if recent:
                bar.set_postfix(
                    {f"valid_{s.select_metric}": f"{np.nanmean(recent):.4f}", "s": f"{seconds:.1f}"}
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

    def finish(self) -> SimulationResult:
        test, selected = self._test(self.ledger.round, final=True)
        return SimulationResult(
            test=test,
            history=self.ledger.history,
            communication=self.ledger.communication,
            failures=self.ledger.failures,
            selected_round=selected,
            uploads=self.ledger.uploads,
            privacy=dict(self.strategy.privacy_report()),
            convergence=convergence_report(self.plateau, self.ledger.round),
            phase_tests=self.ledger.phase_tests,
            elapsed_before=self.elapsed_before,
            secure_aggregation=self.ledger.secure_aggregation,
            participation=self.ledger.participation if self._membership_changed() else [],
        )

    def _membership_changed(self) -> bool:
        """Whether any market joined late or left (the participation record is then worth reporting)."""
        return any(r > 1 for r in self.ledger.joined.values()) or bool(self.settings.leave)


def _text(reply: Any, exc: BaseException) -> str:
    """The failure text of a step: the transport's own error, or the check that refused the reply."""
    return reply.error if isinstance(reply, Failure) else _error_text(exc)
