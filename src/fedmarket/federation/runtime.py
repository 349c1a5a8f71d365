"""The in-process runtime: the round `Driver` over trainers held in this process, deterministic given a seed.

Two transports:

- `InProcessTransport`: calls each market's trainer in turn (serial).
- `ParallelTransport`: markets are independent within a round, so worker processes (forked after the
  trainers are built, one torch thread each) train and evaluate disjoint sets of markets at the same time.
  The driver merges their replies in the fixed market order, so aggregates, metrics and checkpoints are
  bit-identical to the serial transport's with the same thread count (``train.parallel_markets``).

`Simulator` is the in-process driver with keyword settings (`DriverSettings`), as the API and tests build it.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing as mp
import pickle
import traceback
from pathlib import Path
from typing import Any

from fedmarket.errors import FedmarketError
from fedmarket.federation.core import ClientTrainer, MarketMetrics, Strategy
from fedmarket.federation.driver import (  # noqa: F401  (the round bookkeeping's public names live here too)
    Driver,
    DriverSettings,
    Failure,
    Plateau,
    Reply,
    SimulationResult,
    TrainOutcome,
    TrainRequest,
    Transport,
    convergence_report,
    improves,
    select_markets,
    selection_score,
)
from fedmarket.federation.payload import Payload, UploadDeclaration

log = logging.getLogger(__name__)


def _failure(exc: BaseException) -> Failure:
    return Failure(f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=5))


# ------------------------------------------------------------------ what a market does, wherever it runs
def _fit(trainer: ClientTrainer, request: TrainRequest) -> Reply | Failure:
    try:
        update = trainer.fit(request.download, request.config)
    except Exception as exc:  # a failing market must not stop the others
        return _failure(exc)
    return Reply(update.payload, update.num_examples, update.metrics)


def _evaluate(trainer: ClientTrainer, payload: Payload | None) -> MarketMetrics | Failure:
    try:
        return trainer.evaluate(payload, "valid")
    except Exception as exc:
        return _failure(exc)


def _test(
    trainer: ClientTrainer, best_state: Any, full_ranking: bool, final: bool
) -> MarketMetrics | Failure:
    """Test the best state (the current one without a best round). A phase-end test restores the current
    state afterwards, so training goes on exactly as without it; the final test leaves the best one loaded."""
    current = None if final else copy.deepcopy(trainer.state_dict())
    try:
        if best_state is not None:
            trainer.load_state_dict(copy.deepcopy(best_state))
        return trainer.evaluate(None, "test", full_ranking=full_ranking)
    except Exception as exc:
        return _failure(exc)
    finally:
        if current is not None:
            trainer.load_state_dict(current)


class InProcessTransport(Transport):
    """Every market's trainer in this process, called in market order."""

    def __init__(self, trainers: dict[str, ClientTrainer]) -> None:
        if not trainers:
            raise FedmarketError("no markets to train")
        self.trainers = trainers
        self.markets = list(trainers)

    def open(self, seed: int, want_initial: bool) -> Payload | None:
        return next(iter(self.trainers.values())).initial_payload() if want_initial else None

    def train(self, seed, server_round, requests, step=None) -> TrainOutcome:
        return TrainOutcome({m: _fit(self.trainers[m], r) for m, r in requests.items()})

    def evaluate(self, seed, server_round, payloads, best) -> dict[str, MarketMetrics | Failure]:
        return {
            name: _evaluate(self.trainers[name], payloads[name]) for name in self.markets if name in payloads
        }

    def keep(self, name: str) -> dict[str, Any]:
        return {"state": copy.deepcopy(self.trainers[name].state_dict())}

    def test(self, seed, server_round, best, full_ranking, final) -> dict[str, MarketMetrics | Failure]:
        return {
            name: _test(self.trainers[name], (best.get(name) or {}).get("state"), full_ranking, final)
            for name in self.markets
        }

    def state_dict(self) -> dict[str, Any]:
        return {"trainers": {m: t.state_dict() for m, t in self.trainers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["trainers"]) != set(self.trainers):
            raise FedmarketError(
                f"the checkpoint holds markets {sorted(state['trainers'])}, this run has {sorted(self.trainers)}"
            )
        for m, t in self.trainers.items():
            t.load_state_dict(state["trainers"][m])

    def export_trainers(self) -> dict[str, ClientTrainer]:
        """The trainers as they stand (after the final test: each at its selected round)."""
        return self.trainers


# ------------------------------------------------------------------ worker processes
# Messages travel as plain pickles (`Connection.send_bytes`), never through multiprocessing's own pickler:
# that one (with torch imported) moves a tensor's storage into shared memory instead of copying it, so a
# "copy" of a trainer's state would alias the worker's live parameters.
def _send(conn: Any, obj: Any) -> None:
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _recv(conn: Any) -> Any:
    return pickle.loads(conn.recv_bytes())


def _worker(conn: Any, trainers: dict[str, ClientTrainer], threads: int) -> None:
    """A worker's loop: one request at a time from the driver's process, one reply each."""
    import torch

    torch.set_num_threads(threads)
    while True:
        try:
            op, args = _recv(conn)
        except EOFError:
            return
        if op == "close":
            conn.close()
            return
        try:
            if op == "fit":
                out: Any = {m: _fit(trainers[m], r) for m, r in args.items()}
            elif op == "evaluate":
                out = {m: _evaluate(trainers[m], p) for m, p in args.items()}
            elif op == "keep":
                out = trainers[args].state_dict()
            elif op == "test":
                full_ranking, final, states = args
                out = {m: _test(trainers[m], s, full_ranking, final) for m, s in states.items()}
            elif op == "state":
                out = {m: t.state_dict() for m, t in trainers.items()}
            elif op == "load":
                for m, s in args.items():
                    trainers[m].load_state_dict(s)
                out = None
            elif op == "initial":
                out = trainers[args].initial_payload()
            else:
                raise FedmarketError(f"unknown worker request {op!r}")
            _send(conn, ("ok", out))
        except BaseException as exc:  # noqa: BLE001 - the driver re-raises it with the worker's traceback
            _send(conn, ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))


def balance(markets: list[str], workloads: list[int], workers: int) -> dict[str, int]:
    """Market -> worker, so that the most loaded worker (which bounds a round) has as little work as a simple
    search finds: the largest market first, each to the least loaded worker (ties: the lower worker), then
    moves and swaps between the most and least loaded workers while they lower the maximum. Which worker
    trains a market does not change its numbers, only the wall time."""
    size = {m: max(1, int(w)) for m, w in zip(markets, workloads, strict=True)}
    load = [0] * workers
    owner: dict[str, int] = {}
    for m in sorted(markets, key=lambda m: (-size[m], markets.index(m))):
        w = min(range(workers), key=lambda w: (load[w], w))
        owner[m] = w
        load[w] += size[m]
    improved = True
    while improved and workers > 1:
        improved = False
        hi = max(range(workers), key=lambda w: (load[w], -w))
        lo = min(range(workers), key=lambda w: (load[w], w))
        gap = load[hi] - load[lo]
        best = None  # (new max of the pair, market moved from hi, market moved back from lo or None)
        for a in (m for m in markets if owner[m] == hi):
            for b in [None, *(m for m in markets if owner[m] == lo)]:
                delta = size[a] - (size[b] if b else 0)
                if 0 < delta < gap:
                    pair_max = max(load[hi] - delta, load[lo] + delta)
                    if best is None or pair_max < best[0]:
                        best = (pair_max, a, b)
        if best is not None:
            _, a, b = best
            owner[a], load[hi], load[lo] = lo, load[hi] - size[a], load[lo] + size[a]
            if b is not None:
                owner[b], load[lo], load[hi] = hi, load[lo] - size[b], load[hi] + size[b]
            improved = True
    return owner


class ParallelTransport(Transport):
    """Markets trained in ``workers`` forked worker processes (spread by their `ClientTrainer.workload`,
    `balance`); each worker holds its markets' trainers for the whole seed. Requests go to every worker at
    once and the replies are merged in market order, so the driver sees exactly what the serial transport
    gives it."""

    def __init__(self, trainers: dict[str, ClientTrainer], workers: int, threads: int = 1) -> None:
        if not trainers:
            raise FedmarketError("no markets to train")
        if "fork" not in mp.get_all_start_methods():
            raise FedmarketError("train.parallel_markets needs the 'fork' start method (Linux, macOS)")
        self.trainers = trainers
        self.markets = list(trainers)
        self.workers = max(1, min(int(workers), len(self.markets)))
        self.threads = threads
        self.owner = balance(self.markets, [t.workload() for t in trainers.values()], self.workers)
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        self._pending_load: dict[str, Any] | None = None

    # ---------------------------------------------------------------- process management
    def _start(self) -> None:
        if self._procs:
            return
        ctx = mp.get_context("fork")
        for w in range(self.workers):
            mine = {m: t for m, t in self.trainers.items() if self.owner[m] == w}
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, mine, self.threads), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        if self._pending_load is not None:
            self._broadcast("load", self._split(self._pending_load))
            self._pending_load = None

    def _split(self, by_market: dict[str, Any]) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = [{} for _ in range(self.workers)]
        for m, v in by_market.items():
            parts[self.owner[m]][m] = v
        return parts

    def _broadcast(self, op: str, parts: list[Any]) -> list[Any]:
        """Send ``parts[w]`` to worker w (all first, so they work at the same time), then collect."""
        for conn, part in zip(self._conns, parts, strict=True):
            _send(conn, (op, part))
        return [self._receive(w) for w in range(self.workers)]

    def _ask(self, worker: int, op: str, args: Any) -> Any:
        _send(self._conns[worker], (op, args))
        return self._receive(worker)

    def _receive(self, worker: int) -> Any:
        try:
            status, out = _recv(self._conns[worker])
        except EOFError as exc:
            raise FedmarketError(
                f"worker process {worker} (markets {[m for m, w in self.owner.items() if w == worker]}) died "
                f"(exit code {self._procs[worker].exitcode})"
            ) from exc
        if status != "ok":
            raise FedmarketError(f"worker process {worker}: {out}")
        return out

    def _merged(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in parts:
            merged.update(part)
        return {m: merged[m] for m in self.markets if m in merged}  # market order

    # ---------------------------------------------------------------- the transport contract
    def open(self, seed: int, want_initial: bool) -> Payload | None:
        self._start()
        return self._ask(self.owner[self.markets[0]], "initial", self.markets[0]) if want_initial else None

    def train(self, seed, server_round, requests, step=None) -> TrainOutcome:
        return TrainOutcome(self._merged(self._broadcast("fit", self._split(dict(requests)))))

    def evaluate(self, seed, server_round, payloads, best) -> dict[str, MarketMetrics | Failure]:
        return self._merged(
            self._broadcast("evaluate", self._split({m: payloads[m] for m in self.markets if m in payloads}))
        )

    def keep(self, name: str) -> dict[str, Any]:
        return {"state": self._ask(self.owner[name], "keep", name)}

    def test(self, seed, server_round, best, full_ranking, final) -> dict[str, MarketMetrics | Failure]:
        states = {m: (best.get(m) or {}).get("state") for m in self.markets}
        parts = [(full_ranking, final, part) for part in self._split(states)]
        return self._merged(self._broadcast("test", parts))

    def state_dict(self) -> dict[str, Any]:
        self._start()
        return {"trainers": self._merged(self._broadcast("state", [None] * self.workers))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["trainers"]) != set(self.trainers):
            raise FedmarketError(
                f"the checkpoint holds markets {sorted(state['trainers'])}, this run has {sorted(self.trainers)}"
            )
        if self._procs:
            self._broadcast("load", self._split(state["trainers"]))
        else:  # before the workers start: they load it first thing
            self._pending_load = dict(state["trainers"])

    def export_trainers(self) -> dict[str, ClientTrainer]:
        """This process's trainers loaded with the workers' current states (after the final test: each
        market's selected round), for writing the served models."""
        if self._procs:
            for m, s in self.state_dict()["trainers"].items():
                self.trainers[m].load_state_dict(s)
        return self.trainers

    def close(self) -> None:
        """Pull the final states back (for export), then stop the workers."""
        if not self._procs:
            return
        try:
            self.export_trainers()
        except Exception as exc:  # closing after a failure: the failure, not this, is what to report
            log.warning("could not pull the final market states back from the workers: %s", exc)
        finally:
            for conn in self._conns:
                try:
                    _send(conn, ("close", None))
                    conn.close()
                except (BrokenPipeError, OSError):
                    pass
            for proc in self._procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
            self._conns, self._procs = [], []


def in_process_transport(
    trainers: dict[str, ClientTrainer], parallel_markets: int = 0, threads: int = 1
) -> Transport:
    """Serial (``parallel_markets`` ≤ 1, or one market) or in ``parallel_markets`` worker processes."""
    if parallel_markets > 1 and len(trainers) > 1:
        return ParallelTransport(trainers, parallel_markets, threads)
    return InProcessTransport(trainers)


class Simulator(Driver):
    """The in-process driver, built from trainers and keyword settings (`DriverSettings`' fields)."""

    def __init__(
        self,
        trainers: dict[str, ClientTrainer],
        strategy: Strategy,
        declaration: UploadDeclaration,
        *,
        checkpoint_path: str | Path | None = None,
        checkpoint_fallback: bool = False,
        progress: bool = True,
        parallel_markets: int = 0,
        threads: int = 1,
        **settings: Any,
    ) -> None:
        if not trainers:
            raise FedmarketError("no markets to train")
        self.trainers = trainers
        super().__init__(
            in_process_transport(trainers, parallel_markets, threads),
            strategy,
            declaration,
            DriverSettings(**settings),
            checkpoint_path=checkpoint_path,
            checkpoint_fallback=checkpoint_fallback,
            progress=progress,
        )

    def save_selected_models(self, folder: str | Path) -> list[Path]:
        """Write each market's model at its selected round (``models/seed<N>/<market>.safetensors``, for
        serving). Call after `run`: the trainers then hold their best states."""
        from fedmarket.serving.models import write_selected_models

        selected = {name: int(best["round"]) for name, best in self.ledger.best.items()}
        trainers = self.transport.export_trainers()  # type: ignore[attr-defined]
        return write_selected_models(trainers, selected, folder, self.settings.seed)
