"""The ServerApp side: the method's own `Strategy`, driven round by round over a Flower ``Grid``.

Each round is the in-process `Simulator`'s round (same market selection, same checks, same aggregation order,
same best-round rule, via the shared functions of `fedmarket.federation.runtime`), with messages instead of
calls:

1. discover SuperNodes (a ``query`` message asks each new node which market it serves; the first market's
   reply also carries the initial shared parameters, as the in-process runtime takes the first trainer's);
2. ``train``: each selected market gets its own download (strategies may personalise); every reply is
   checked against the method's `UploadDeclaration` and by `validate_update`, then aggregated in market order
   (so the float sums equal the in-process ones);
3. ``evaluate`` on validation for every market; the server keeps each market's best round (it sees only the
   metrics — the model state stays in the market, which keeps a snapshot of that round, see `client`);
4. after the last round, ``evaluate`` on test with each market restoring its selected round.

A market whose node is missing, errors, times out or uploads something invalid is recorded in ``failures``
and left out of that step; the round fails only below ``train.min_markets``. A node that (re)connects is
discovered at the next round and rejoins. After every round the server state is checkpointed in the run
folder, so a run whose SuperLink died is resumed by submitting it again with ``resume=true``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from flwr.app import Message, RecordDict

from fedmarket.api import (
    _write_json,
    describe_server_step,
    new_run_dir,
    protect_strategy,
    seed_record,
    write_results,
)
from fedmarket.checkpoint import load_state, save_state
from fedmarket.config import ExperimentConfig, load_config
from fedmarket.errors import FedmarketError
from fedmarket.federation.core import Strategy, Update
from fedmarket.federation.payload import (
    check_not_replayed,
    payload_bytes,
    validate_num_examples,
    validate_update,
)
from fedmarket.federation.runtime import (
    Plateau,
    SimulationResult,
    convergence_report,
    improves,
    select_markets,
    selection_score,
)
from fedmarket.flower.records import (
    ARRAYS,
    ENVELOPE,
    METRICS,
    envelope,
    open_envelope,
    payload_to_record,
    record_to_payload,
)
from fedmarket.flower.secagg import run_secure_round, secure_aggregation_report
from fedmarket.matmul import configure_torch
from fedmarket.methods import get_method
from fedmarket.methods.base import Method

log = logging.getLogger(__name__)


def server_strategy(method: Method, cfg: ExperimentConfig, seed: int) -> Strategy:
    """The method's server strategy without any market data: ``build`` with no splits. Every method plugs
    into Flower this way, so its ``build`` must accept an empty split dict (return no trainers)."""
    if not method.private:
        raise FedmarketError(
            f"method {method.name!r} pools raw data (not private); it has no federated form to run on Flower"
        )
    trainers, strategy = method.build(cfg, method.parse_options(cfg.method.options), {}, seed)
    if trainers:
        raise FedmarketError(f"method {method.name!r} built trainers without data; cannot run on Flower")
    return strategy


class FlowerServer:
    """Runs every seed of an experiment over ``grid`` and writes the run folder."""

    def __init__(
        self,
        grid: Any,
        cfg: ExperimentConfig,
        run_dir: Path,
        *,
        resume: bool = False,
        reply_timeout: float = 600.0,
        wait_nodes: float = 120.0,
        state_dir: str = "",
        poll_interval: float = 0.05,
        bound_nodes: dict[str, int] | None = None,
    ) -> None:
        self.grid = grid
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.reply_timeout = reply_timeout
        self.wait_nodes = wait_nodes
        self.state_dir = state_dir
        self.poll_interval = poll_interval
        self.method = get_method(cfg.method.name)
        self.declaration = self.method.declaration_for(cfg)  # the declaration in force for these options
        self.experiment = json.dumps(cfg.to_dict())
        self.key = run_dir.name  # names the markets' state folders; stable across a resume
        self.nodes: dict[str, int] = {}  # market -> node id
        self.known_nodes: set[int] = set()
        self.refused_claims: list[dict[str, Any]] = []  # second claims of a market whose node is online
        self.evaluation: dict[str, dict[str, Any]] = {}  # market -> what its split evaluates (hello replies)
        # with SuperNode authentication: market -> the node id its registered key got; no other node may serve it
        self.bound_nodes = dict(bound_nodes or {})
        self.markets: list[str] = list(cfg.dataset.markets or [])
        self.timings: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------- messaging
    def _request(self, seed: int, server_round: int, **fields: Any) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "key": self.key,
            "seed": seed,
            "round": server_round,
            "state_dir": self.state_dir,
            **fields,
        }

    def exchange(
        self, kind: str, contents: dict[Any, RecordDict], destinations: dict[Any, int], tag: dict[str, Any]
    ) -> tuple[dict[Any, Message], dict[Any, str]]:
        """Send one message per key, wait for the replies (at most ``reply_timeout``), and return the good
        replies and an error text per key that has none. A destination that drops off the SuperLink's node
        list stops being waited for."""
        errors: dict[Any, str] = {}
        messages: dict[Any, Message] = {}
        for key, content in contents.items():
            messages[key] = Message(content=content, dst_node_id=destinations[key], message_type=kind)
        if not messages:
            return {}, errors
        sent = time.perf_counter()
        ids = list(self.grid.push_messages(list(messages.values())))
        pending = {mid: key for mid, key in zip(ids, messages, strict=True) if mid}
        for key in set(messages) - set(pending.values()):
            errors[key] = "message could not be pushed"
        replies: dict[Any, Message] = {}
        deadline = sent + self.reply_timeout
        last_check = sent
        while pending and time.perf_counter() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is None:
                    continue
                if reply.has_error():
                    errors[key] = f"error {reply.error.code}: {reply.error.reason}"
                    continue
                replies[key] = reply
                body = open_envelope(reply.content[ENVELOPE])
                self.timings.append(
                    {
                        **tag,
                        "stage": kind,
                        "key": str(key),
                        "round_trip": time.perf_counter() - sent,
                        **body.get("timing", {}),
                    }
                )
            if pending and time.perf_counter() - last_check > 2.0:
                last_check = time.perf_counter()
                online = set(self.grid.get_node_ids())
                for mid, key in list(pending.items()):
                    if destinations[key] not in online:
                        errors[key] = f"node {destinations[key]} went offline"
                        del pending[mid]
            if pending:
                time.sleep(self.poll_interval)
        for key in pending.values():
            errors[key] = f"no reply within {self.reply_timeout:.0f} s"
        return replies, errors

    def discover(self, seed: int, want_initial: bool, wait: float) -> dict[str, Any]:
        """Map markets to connected nodes, asking new nodes which market they serve. Waits up to ``wait``
        seconds for every expected market. Returns the initial payload of the first market if asked."""
        deadline = time.perf_counter() + wait
        initial: dict[str, Any] = {}
        while True:
            online = set(self.grid.get_node_ids())
            self.nodes = {m: n for m, n in self.nodes.items() if n in online}
            new = sorted(online - self.known_nodes)
            if new:
                req = self._request(seed, 0, want_initial=want_initial)
                contents = {n: RecordDict({ENVELOPE: envelope(**req)}) for n in new}
                replies, errors = self.exchange(
                    "query", contents, {n: n for n in new}, {"seed": seed, "round": 0}
                )
                for node, reply in replies.items():
                    body = open_envelope(reply.content[ENVELOPE])
                    market = body["market"]
                    self.known_nodes.add(node)
                    if self.bound_nodes and self.bound_nodes.get(market) != node:
                        log.warning(
                            "node %s claims market %r, whose registered node is %s: refused",
                            node,
                            market,
                            self.bound_nodes.get(market),
                        )
                        claim = {
                            "node": int(node),
                            "market": market,
                            "reason": "not the market's registered node",
                        }
                        if claim not in self.refused_claims:
                            self.refused_claims.append(claim)
                        continue
                    if market in self.nodes and self.nodes[market] != node:
                        # the market's node is still online: a second claim is refused (a restarted market's
                        # new node replaces its old one only once the old one has gone)
                        log.warning(
                            "node %s claims market %r, which node %s (online) serves: refused",
                            node,
                            market,
                            self.nodes[market],
                        )
                        claim = {"node": int(node), "market": market}
                        if claim not in self.refused_claims:
                            self.refused_claims.append(claim)
                        continue
                    self.nodes[market] = node
                    if body.get("evaluation"):
                        self.evaluation[market] = body["evaluation"]
                    if ARRAYS in reply.content:
                        initial[market] = record_to_payload(reply.content[ARRAYS])
                for node, err in errors.items():
                    log.warning("node %s did not answer discovery: %s", node, err)
            expected = self.markets or sorted(self.nodes)
            if self.nodes and all(m in self.nodes for m in expected):
                break
            if time.perf_counter() > deadline:
                break
            time.sleep(1.0)
        if not self.markets:
            self.markets = sorted(self.nodes)
        return initial

    # ----------------------------------------------------------------------------- one seed
    def run_seed(self, seed: int) -> SimulationResult:
        cfg = self.cfg
        base_strategy = server_strategy(self.method, cfg, seed)
        # the same server-side wrappers as in process (DP noise + accountant); secure aggregation is Flower's
        # SecAgg+ (`fedmarket.flower.secagg`), not the in-process simulation
        strategy = protect_strategy(
            cfg, base_strategy, seed, simulate_secure_aggregation=False, num_markets=len(self.markets)
        )
        ckpt = self.run_dir / "checkpoints" / f"seed{seed}.ckpt"
        state = self._fresh_state()
        resumed = self.resume and ckpt.exists()
        if resumed:
            saved = load_state(ckpt)
            strategy.load_state_dict(saved["strategy"])
            state = {k: saved.get(k, v) for k, v in state.items()}  # older checkpoints lack new keys
            self.markets = saved["markets"]
            log.info("seed %d: resumed from %s at round %d", seed, ckpt, state["round"])
        initial = self.discover(seed, want_initial=not resumed, wait=self.wait_nodes)
        if not self.markets:
            raise FedmarketError("no SuperNode connected")
        if not resumed:
            if not any(m in initial for m in self.markets):  # nodes known before this seed: ask again
                self.known_nodes -= set(self.nodes.values())
                initial = self.discover(seed, want_initial=True, wait=0.0)
            first = next((m for m in self.markets if m in initial), None)
            if first is None:
                raise FedmarketError(f"no market answered with initial parameters; nodes: {self.nodes}")
            strategy.initialize(initial[first])
            state["communication"] = {m: {"up_bytes": 0, "down_bytes": 0, "rounds": 0} for m in self.markets}
        min_markets = min(cfg.train.min_markets, len(self.markets))
        stop_before = getattr(strategy, "stop_before", None)  # e.g. a privacy budget (target ε)
        plateau = Plateau(
            cfg.train.patience,
            cfg.train.min_delta,
            cfg.eval.select_metric,
            phase_patience=cfg.train.phase_patience,
            stop_slope=cfg.train.stop_slope,
            slope_window=cfg.train.slope_window,
        )
        plateau.load_state_dict(state.get("plateau"))
        for server_round in range(state["round"] + 1, cfg.train.rounds + 1):
            if plateau.converged_round is not None:
                break  # resumed after convergence
            if stop_before is not None and stop_before(server_round):
                log.info("stopping before round %d (the strategy's stop condition)", server_round)
                break
            t0 = time.perf_counter()
            self.discover(seed, want_initial=False, wait=0.0)  # a (re)started node rejoins here
            self.run_round(seed, server_round, strategy, state, min_markets)
            self.timings.append(
                {"seed": seed, "round": server_round, "stage": "round", "seconds": time.perf_counter() - t0}
            )
            state["round"] = server_round
            ends = len(plateau.phase_ends)
            converged = plateau.update(server_round, state["history"], strategy)
            if len(plateau.phase_ends) > ends:  # a phase ended: test the run as if it stopped here
                test, selected = self._test_best(seed, state, server_round)
                state["phase_tests"].append({"round": server_round, "test": test, "selected_round": selected})
            state["plateau"] = plateau.state_dict()
            self._checkpoint(ckpt, strategy, state)
            _write_json(
                self.run_dir / "flower_progress.json",
                {"seed": seed, "round": server_round, "seconds": time.perf_counter() - t0},
            )
            if converged:
                log.info("seed %d: converged (train.patience), stopping after round %d", seed, server_round)
                break
        self.discover(seed, want_initial=False, wait=0.0)
        result = self.finish(seed, state)
        result.convergence = convergence_report(plateau, state["round"])
        result.privacy = dict(getattr(strategy, "privacy_report", dict)())
        result.privacy["server_step"] = describe_server_step(base_strategy, cfg.train.rounds)
        if cfg.secure_aggregation.enabled:
            result.privacy.update(secure_aggregation_report(cfg, state["secure_aggregation"]))
        return result

    def _fresh_state(self) -> dict[str, Any]:
        return {
            "round": 0,
            "history": [],
            "secure_aggregation": [],  # per round: through SecAgg+ or in the clear, and why
            "failures": [],
            "uploads": [],
            "communication": {},
            "best": {},
            "plateau": {},
            "phase_tests": [],
            "upload_digests": {},
        }

    def _checkpoint(self, path: Path, strategy: Strategy, state: dict[str, Any]) -> None:
        save_state(
            path, {**state, "strategy": strategy.state_dict(), "markets": self.markets, "runtime": "flower"}
        )

    def _fail(self, state: dict, seed: int, server_round: int, market: str, stage: str, error: str) -> None:
        log.warning("round %d: market %s failed in %s: %s", server_round, market, stage, error)
        state["failures"].append(
            {
                "seed": seed,
                "round": server_round,
                "market": market,
                "stage": stage,
                "error": error,
                "traceback": "",
            }
        )

    def _send(
        self,
        seed: int,
        server_round: int,
        kind: str,
        requests: dict[str, tuple[dict, dict]],
        state: dict,
        stage: str,
    ) -> dict[str, Message]:
        """Send each market its (envelope fields, payload); markets without a node fail at once."""
        contents, destinations = {}, {}
        for market, (fields, payload) in requests.items():
            if market not in self.nodes:
                self._fail(state, seed, server_round, market, stage, "no SuperNode connected for this market")
                continue
            contents[market] = RecordDict(
                {
                    ENVELOPE: envelope(**self._request(seed, server_round, **fields)),
                    ARRAYS: payload_to_record(payload),
                }
            )
            destinations[market] = self.nodes[market]
        replies, errors = self.exchange(kind, contents, destinations, {"seed": seed, "round": server_round})
        for market, err in errors.items():
            self._fail(state, seed, server_round, market, stage, err)
        return {m: replies[m] for m in requests if m in replies}

    def run_round(
        self, seed: int, server_round: int, strategy: Strategy, state: dict, min_markets: int
    ) -> None:
        if self.cfg.secure_aggregation.enabled and run_secure_round(
            self, seed, server_round, strategy, state, min_markets
        ):
            return  # a weighted-sum round went through Flower's SecAgg+ (`fedmarket.flower.secagg`)
        cfg = self.cfg
        selected = select_markets(
            self.markets, seed, server_round, cfg.train.client_fraction, min_markets, self.secret_draws(state)
        )
        downloads = strategy.configure_train(server_round, selected)
        options = strategy.round_options(server_round)
        requests = {}
        for market in selected:
            down = downloads.get(market, {})
            state["communication"][market]["down_bytes"] += payload_bytes(down)
            best = state["best"].get(market)
            fields = {
                "local_epochs": cfg.train.local_epochs,
                "options": options,
                "keep_round": best["round"] if best else 0,
            }
            requests[market] = (fields, down)
        replies = self._send(seed, server_round, "train", requests, state, "fit")
        updates: dict[str, Update] = {}
        for market in selected:  # market order, not arrival order: the aggregate's float sums depend on it
            if market not in replies:
                continue
            reply = replies[market]
            down = downloads.get(market, {})
            try:
                upload = record_to_payload(reply.content[ARRAYS])
                metrics = dict(reply.content[METRICS])
                num_examples = validate_num_examples(
                    metrics.pop("num_examples", None),
                    market,
                    self.cfg.train.max_examples,
                    uploaded=bool(upload),
                )
                self.declaration.check(upload, market)
                metrics = self.declaration.check_metrics(metrics, market, "training metric")
                validate_update(upload, down if down else None, market)
                check_not_replayed(upload, market, state.setdefault("upload_digests", {}))
            except Exception as exc:
                self._fail(state, seed, server_round, market, "fit", f"{type(exc).__name__}: {exc}")
                continue
            up = payload_bytes(upload)
            state["communication"][market]["up_bytes"] += up
            state["communication"][market]["rounds"] += 1
            state["uploads"].append(
                {
                    "seed": seed,
                    "round": server_round,
                    "market": market,
                    "bytes": up,
                    "down_bytes": payload_bytes(down),
                    "keys": {k: list(np.shape(v)) for k, v in upload.items()},
                }
            )
            updates[market] = Update(upload, num_examples, {k: float(v) for k, v in metrics.items()})
        if len(updates) < min_markets:
            failed = [
                f["market"] for f in state["failures"] if f["round"] == server_round and f["seed"] == seed
            ]
            raise FedmarketError(
                f"round {server_round}: only {len(updates)} market(s) succeeded, fewer than train.min_markets="
                f"{min_markets}; failures: {failed}"
            )
        strategy.aggregate_train(server_round, updates)
        if server_round % cfg.eval.every == 0 or server_round == cfg.train.rounds:
            self.evaluate_round(seed, server_round, strategy, state, updates)

    def evaluate_round(
        self, seed: int, server_round: int, strategy: Strategy, state: dict, updates: dict[str, Update]
    ) -> None:
        cfg = self.cfg
        payloads = strategy.configure_evaluate(server_round, self.markets)
        requests = {}
        for market in self.markets:
            best = state["best"].get(market)
            fields = {"split": "valid", "keep_round": best["round"] if best else 0}
            requests[market] = (fields, payloads.get(market) or {})
        replies = self._send(seed, server_round, "evaluate", requests, state, "evaluate")
        hook = getattr(strategy, "round_metrics", None)  # server-side columns, e.g. ε
        extra = dict(hook(server_round)) if hook is not None else {}
        for name in self.markets:
            if name not in replies:
                continue
            metrics = self._reported(state, seed, server_round, name, replies[name], "evaluate")
            if metrics is None:
                continue
            for market, values in metrics.items():
                row = {"seed": seed, "round": server_round, "market": market, "split": "valid", **values}
                row.update(extra)
                if name in updates:
                    row.update({f"train_{k}": v for k, v in updates[name].metrics.items()})
                state["history"].append(row)
            score = selection_score(metrics, cfg.eval.select_metric)
            prev = state["best"].get(name)
            if cfg.eval.select == "last" or improves(
                prev["score"] if prev else None, score, cfg.eval.select_metric
            ):
                state["best"][name] = {"score": score, "round": server_round}

    def _test_best(
        self, seed: int, state: dict, server_round: int
    ) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
        """Each market tests its best round so far (the market restores that round's saved state for this
        message only: its next ``train`` loads its latest state again, so a mid-run test changes nothing)."""
        requests = {}
        for market in self.markets:
            best = state["best"].get(market)
            fields = {
                "split": "test",
                "restore_round": best["round"] if best else 0,
                "full_ranking": self.cfg.eval.full_ranking,
            }
            requests[market] = (fields, {})
        replies = self._send(seed, server_round, "evaluate", requests, state, "test")
        test: dict[str, dict[str, float]] = {}
        for market in self.markets:
            if market in replies:
                test.update(self._reported(state, seed, server_round, market, replies[market], "test") or {})
        return test, {m: b["round"] for m, b in state["best"].items()}

    def secret_draws(self, state: dict) -> dict[int, list[str]] | None:
        """With ``privacy.secret_sampling`` (and DP on), the record of each round's secret draw, kept in the
        server's checkpointed state for resume (`select_markets`); None: the seeded, public draw."""
        p = self.cfg.privacy
        if p.mode == "off" or not p.secret_sampling:
            return None
        draws = state.setdefault("draws", {})
        for key in [k for k in draws if isinstance(k, str)]:  # JSON-restored keys
            draws[int(key)] = draws.pop(key)
        return draws

    def _reported(
        self, state: dict, seed: int, server_round: int, name: str, reply: Any, stage: str
    ) -> dict[str, dict[str, float]] | None:
        """The per-market metrics of an evaluate reply, checked against the declaration in force (undeclared
        keys or non-scalar values: that market fails this stage, recorded; None)."""
        try:
            metrics = open_envelope(reply.content[ENVELOPE])["metrics"]
            return {m: self.declaration.check_metrics(v, m, f"{stage} metric") for m, v in metrics.items()}
        except Exception as exc:
            self._fail(state, seed, server_round, name, stage, f"{type(exc).__name__}: {exc}")
            return None

    def finish(self, seed: int, state: dict) -> SimulationResult:
        test, selected = self._test_best(seed, state, state["round"])
        return SimulationResult(
            test=test,
            history=state["history"],
            communication=state["communication"],
            failures=state["failures"],
            selected_round=selected,
            uploads=state["uploads"],
            phase_tests=state["phase_tests"],
        )

    # ----------------------------------------------------------------------------- every seed
    def run(self) -> Path:
        run_dir, cfg = self.run_dir, self.cfg
        (run_dir / "seeds").mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").exists():
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        started = time.perf_counter()
        per_seed = []
        for seed in cfg.seeds:
            seed_file = run_dir / "seeds" / f"seed{seed}.json"
            if self.resume and seed_file.exists():
                per_seed.append(json.loads(seed_file.read_text()))
                continue
            t0 = time.perf_counter()
            result = self.run_seed(seed)
            record = seed_record(
                seed,
                result,
                time.perf_counter() - t0,
                self.cfg.eval.protocol,
                evaluation=dict(self.evaluation),
            )
            _write_json(seed_file, record)
            per_seed.append(record)
            self.nodes, self.known_nodes = {}, set()  # each seed re-discovers (nodes may have changed)
        _write_json(run_dir / "flower_timing.json", self.timings)
        if self.refused_claims:  # nodes that claimed a market another online node already served
            _write_json(run_dir / "flower_refused_claims.json", self.refused_claims)
        write_results(cfg, run_dir, per_seed, time.perf_counter() - started, markets=self.markets)
        from fedmarket.tracking import track_run

        track_run(cfg, run_dir)  # config `tracking`, as in process; a failure only warns
        return run_dir


def parse_market_nodes(text: str) -> dict[str, int]:
    """``"in:123,jp:456"`` (run config ``market-nodes``, written by ``fedmarket deploy --auth``) as a dict."""
    out: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        market, _, node = item.rpartition(":")
        if not market or not node.isdigit():
            raise FedmarketError(f"run config market-nodes: {item!r} is not market:node-id")
        out[market] = int(node)
    return out


def serve(grid: Any, run_config: dict[str, Any]) -> Path:
    """The ServerApp body. Run config: ``run-dir`` (a folder holding ``config.yaml``, written by
    ``fedmarket flower ...``) or ``config`` (a YAML path; a new run folder is made under its output_dir);
    ``resume``; ``reply-timeout`` and ``wait-nodes`` in seconds; ``state-dir`` (a hint for clients without
    their own ``state-dir`` node config: simulation on one machine)."""
    run_dir_text = str(run_config.get("run-dir", "") or "")
    config_text = str(run_config.get("config", "") or "")
    if run_dir_text and Path(run_dir_text, "config.yaml").exists():
        run_dir = Path(run_dir_text)
        cfg = load_config(run_dir / "config.yaml")
    elif config_text:
        cfg = load_config(config_text)
        run_dir = Path(run_dir_text) if run_dir_text else new_run_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        raise FedmarketError("run config needs run-dir (holding config.yaml) or config (a YAML path)")
    configure_torch(cfg.train.threads, cfg.train.matmul)
    server = FlowerServer(
        grid,
        cfg,
        run_dir,
        resume=bool(run_config.get("resume", False)),
        reply_timeout=float(run_config.get("reply-timeout", 600.0)),
        wait_nodes=float(run_config.get("wait-nodes", 120.0)),
        state_dir=str(run_config.get("state-dir", "") or ""),
        bound_nodes=parse_market_nodes(str(run_config.get("market-nodes", "") or "")),
    )
    try:
        return server.run()
    except BaseException as exc:
        _write_json(run_dir / "flower_error.json", {"error": f"{type(exc).__name__}: {exc}"})
        raise
