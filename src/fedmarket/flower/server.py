"""The ServerApp side: the method's own `Strategy`, run by the one round `Driver` over a Flower ``Grid``.

The round loop is `fedmarket.federation.driver.Driver`, the same one the in-process runtime runs (market
selection, download accounting, every upload check, aggregation in market order, best-round rule, early
stopping, checkpoints). On Flower it reaches the markets through `FlowerTransport`, which turns each of its
steps into messages:

1. discovery (`FlowerTransport.open`, and `refresh` before every round): a ``query`` message asks each new
   node which market it serves; the first market's reply also carries the initial shared parameters, as the
   in-process runtime takes the first trainer's. Markets listed in ``train.join`` are not waited for at the
   start; a node that connects later for a market not yet in the run adds that market (if
   ``dataset.markets`` is empty or lists it), and the driver decides from which round it takes part;
2. ``train``: each selected market gets its own download; its reply (upload, example count, training
   metrics) goes to the driver, which checks it against the method's `UploadDeclaration` and by
   `validate_update` before aggregating. With ``secure_aggregation`` on, a round whose server step is a
   weighted sum is Flower's SecAgg+ protocol instead (`fedmarket.flower.secagg.secure_train`): the driver
   receives the reconstructed aggregate as every surviving market's (secured) reply;
3. ``evaluate`` on validation for every market; the driver keeps each market's best round (it sees only the
   metrics — the model state stays in the market, which keeps a snapshot of that round, see `client`);
4. at a phase end and after the last round, ``evaluate`` on test with each market restoring its best round.

A market whose node is missing, errors, times out or uploads something invalid is recorded in ``failures``
and left out of that step; the round fails only below ``train.min_markets``. A node that (re)connects is
discovered at the next round and rejoins. After every round the driver checkpoints the seed in the run
folder (with the transport's market list), so a run whose SuperLink died is resumed by submitting it again
with ``resume=true``. `FlowerServer` runs every seed and writes the run folder (plus ``flower_timing.json``,
``flower_progress.json`` and refused market claims).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

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
from fedmarket.config import ExperimentConfig, load_config
from fedmarket.errors import FedmarketError
from fedmarket.federation.core import MarketMetrics, Strategy
from fedmarket.federation.driver import (
    Driver,
    DriverSettings,
    Failure,
    Reply,
    SimulationResult,
    TrainOutcome,
    TrainRequest,
    Transport,
)
from fedmarket.federation.payload import Payload
from fedmarket.flower.records import (
    ARRAYS,
    ENVELOPE,
    METRICS,
    envelope,
    open_envelope,
    payload_to_record,
    record_to_payload,
)
from fedmarket.flower.secagg import secure_aggregation_report, secure_train
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


# ------------------------------------------------------------------------------------ the transport
def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _train_reply(message: Message | Failure) -> Reply | Failure:
    """A ``train`` reply as the driver checks it: upload, example count (from the metrics), metrics."""
    if isinstance(message, Failure):
        return message
    try:
        upload = record_to_payload(message.content[ARRAYS])
        metrics = dict(message.content[METRICS])
    except Exception as exc:  # a malformed reply fails that market alone
        return Failure(_error_text(exc))
    return Reply(upload, metrics.pop("num_examples", None), metrics)


def _reported(message: Message | Failure) -> MarketMetrics | Failure:
    """The per-market metrics of an ``evaluate`` reply (checked by the driver against the declaration)."""
    if isinstance(message, Failure):
        return message
    try:
        return open_envelope(message.content[ENVELOPE])["metrics"]
    except Exception as exc:
        return Failure(_error_text(exc))


def _best_round(best: dict[str, dict], market: str) -> int:
    entry = best.get(market)
    return int(entry["round"]) if entry else 0


class FlowerTransport(Transport):
    """The driver's markets over a Flower ``Grid``, one message per market and step, through ``server``
    (`FlowerServer`: discovery, messaging, timings). ``markets`` starts as ``server.markets`` (the
    configured markets, or those of the previous seed) or a checkpoint's, and may grow at `refresh`."""

    def __init__(self, server: FlowerServer) -> None:
        self.server = server
        self.cfg = server.cfg
        self.markets = list(server.markets)
        self.secure_aggregation = bool(server.cfg.secure_aggregation.enabled)
        self._restored = False  # markets come from a checkpoint

    # ----------------------------------------------------------------------------- what secagg reads
    @property
    def grid(self) -> Any:
        return self.server.grid

    @property
    def nodes(self) -> dict[str, int]:
        """market -> node id of every market whose node is online and accepted."""
        return self.server.nodes

    @property
    def reply_timeout(self) -> float:
        return self.server.reply_timeout

    def request(self, seed: int, server_round: int, **fields: Any) -> dict[str, Any]:
        """A request envelope's fields (`FlowerServer.request`)."""
        return self.server.request(seed, server_round, **fields)

    # ----------------------------------------------------------------------------- markets
    def _awaited(self) -> list[str]:
        """The markets discovery waits for: all known ones except those that join later (``train.join``)."""
        return [m for m in self.markets if m not in self.cfg.train.join]

    def _grow(self) -> None:
        """Append the markets of connected nodes not in the run yet (sorted among themselves), when
        ``dataset.markets`` is empty or lists them."""
        listed = self.cfg.dataset.markets
        new = sorted(m for m in self.nodes if m not in self.markets and (not listed or m in listed))
        self.markets.extend(new)

    def open(self, seed: int, want_initial: bool) -> Payload | None:
        server = self.server
        initial = server.discover(seed, want_initial, server.wait_nodes, expected=self._awaited())
        if not self._restored:  # a market that joins later is in the run from the start only if it is here
            self.markets = [m for m in self.markets if m not in self.cfg.train.join or m in self.nodes]
        self._grow()
        if not self.markets:
            raise FedmarketError("no SuperNode connected")
        if not want_initial:
            return None
        if not any(m in initial for m in self.markets):  # nodes known before this seed: ask again
            server.known_nodes -= set(self.nodes.values())
            initial = server.discover(seed, want_initial=True, wait=0.0, expected=self._awaited())
        first = next((m for m in self.markets if m in initial), None)
        if first is None:
            raise FedmarketError(f"no market answered with initial parameters; nodes: {self.nodes}")
        return initial[first]

    def refresh(self, seed: int) -> None:
        self.server.discover(seed, want_initial=False, wait=0.0, expected=[])  # a (re)started node rejoins
        self._grow()

    # ----------------------------------------------------------------------------- messaging
    def send(
        self, seed: int, server_round: int, kind: str, requests: dict[str, tuple[dict[str, Any], Payload]]
    ) -> dict[str, Message | Failure]:
        """Send each market its (envelope fields, payload); one reply or failure per market, in the order of
        ``requests`` (a market without a node fails at once)."""
        contents, destinations = {}, {}
        for market, (fields, payload) in requests.items():
            if market not in self.nodes:
                continue
            contents[market] = RecordDict(
                {
                    ENVELOPE: envelope(**self.request(seed, server_round, **fields)),
                    ARRAYS: payload_to_record(payload),
                }
            )
            destinations[market] = self.nodes[market]
        replies, errors = self.server.exchange(
            kind, contents, destinations, {"seed": seed, "round": server_round}
        )
        out: dict[str, Message | Failure] = {}
        for market in requests:
            if market not in destinations:
                out[market] = Failure("no SuperNode connected for this market")
            elif market in replies:
                out[market] = replies[market]
            else:
                out[market] = Failure(errors.get(market, "no reply"))
        return out

    # ----------------------------------------------------------------------------- the steps
    def train(
        self,
        seed: int,
        server_round: int,
        requests: dict[str, TrainRequest],
        step: tuple[bool, str] | None = None,
    ) -> TrainOutcome:
        secure = None
        if self.secure_aggregation and step is not None:
            is_sum, why = step
            if is_sum and sum(m in self.nodes for m in requests) < 2:
                is_sum, why = False, "fewer than 2 markets reachable: a sum of one upload is that upload"
            if is_sum:  # a weighted-sum round goes through Flower's SecAgg+ (`fedmarket.flower.secagg`)
                return secure_train(self, seed, server_round, requests, why)
            secure = {"secure": False, "reason": why}
        messages = {
            market: (
                {
                    "local_epochs": r.config.local_epochs,
                    "options": r.config.options,
                    "keep_round": r.keep_round,
                },
                r.download,
            )
            for market, r in requests.items()
        }
        replies = self.send(seed, server_round, "train", messages)
        return TrainOutcome({m: _train_reply(r) for m, r in replies.items()}, secure)

    def evaluate(
        self, seed: int, server_round: int, payloads: dict[str, Payload | None], best: dict[str, dict]
    ) -> dict[str, MarketMetrics | Failure]:
        requests = {  # the markets taking part (the driver's ``payloads`` keys), in market order
            m: ({"split": "valid", "keep_round": _best_round(best, m)}, payloads[m] or {})
            for m in self.markets
            if m in payloads
        }
        return {m: _reported(r) for m, r in self.send(seed, server_round, "evaluate", requests).items()}

    def test(
        self, seed: int, server_round: int, best: dict[str, dict], full_ranking: bool, final: bool
    ) -> dict[str, MarketMetrics | Failure]:
        """Each market tests its best round so far (the market restores that round's saved state for this
        message only: its next ``train`` loads its latest state again, so a mid-run test changes nothing)."""
        requests = {
            m: (
                {"split": "test", "restore_round": _best_round(best, m), "full_ranking": full_ranking},
                {},
            )
            for m in self.markets
        }
        return {m: _reported(r) for m, r in self.send(seed, server_round, "evaluate", requests).items()}

    def round_done(self, seed: int, server_round: int, seconds: float) -> None:
        self.server.timings.append(
            {"seed": seed, "round": server_round, "stage": "round", "seconds": seconds}
        )
        _write_json(
            self.server.run_dir / "flower_progress.json",
            {"seed": seed, "round": server_round, "seconds": seconds},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"markets": list(self.markets), "runtime": "flower"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.markets = list(state["markets"])
        self._restored = True


# ------------------------------------------------------------------------------------ the ServerApp
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
        # the markets of the run: the configured ones, or (none configured) the previous seed's; each seed's
        # `FlowerTransport` starts from it and leaves its own here
        self.markets: list[str] = list(cfg.dataset.markets or [])
        self.timings: list[dict[str, Any]] = []

    # ----------------------------------------------------------------------------- messaging
    def request(self, seed: int, server_round: int, **fields: Any) -> dict[str, Any]:
        """The fields of a request envelope: the experiment, the run key, seed, round and ``fields``."""
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

    def discover(
        self, seed: int, want_initial: bool, wait: float, expected: list[str] | None = None
    ) -> dict[str, Payload]:
        """Map markets to connected nodes, asking new nodes which market they serve. Waits up to ``wait``
        seconds until every market in ``expected`` (default: ``markets``; none: any market) has a node.
        Returns market -> initial payload of the markets that sent one (asked with ``want_initial``)."""
        deadline = time.perf_counter() + wait
        awaited = self.markets if expected is None else expected
        initial: dict[str, Payload] = {}
        while True:
            online = set(self.grid.get_node_ids())
            self.nodes = {m: n for m, n in self.nodes.items() if n in online}
            new = sorted(online - self.known_nodes)
            if new:
                req = self.request(seed, 0, want_initial=want_initial)
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
            if self.nodes and all(m in self.nodes for m in awaited):
                break
            if time.perf_counter() > deadline:
                break
            time.sleep(1.0)
        return initial

    # ----------------------------------------------------------------------------- one seed
    def run_seed(self, seed: int) -> SimulationResult:
        """One seed: the round `Driver` over a `FlowerTransport`, checkpointed in the run folder."""
        cfg = self.cfg
        base_strategy = server_strategy(self.method, cfg, seed)
        # the same server-side wrappers as in process (DP noise + accountant); secure aggregation is Flower's
        # SecAgg+ (`fedmarket.flower.secagg`), not the in-process simulation
        strategy = protect_strategy(
            cfg, base_strategy, seed, simulate_secure_aggregation=False, num_markets=len(self.markets)
        )
        ckpt = self.run_dir / "checkpoints" / f"seed{seed}.ckpt"
        transport = FlowerTransport(self)
        driver = Driver(
            transport,
            strategy,
            self.declaration,
            DriverSettings.from_config(cfg, seed),
            checkpoint_path=ckpt,
            progress=cfg.progress,
        )
        result = driver.run(resume=self.resume and ckpt.exists())
        self.markets = list(transport.markets)
        result.privacy["server_step"] = describe_server_step(base_strategy, cfg.train.rounds)
        if cfg.secure_aggregation.enabled:
            result.privacy.update(secure_aggregation_report(cfg, result.secure_aggregation))
        return result

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
                result.elapsed_before + time.perf_counter() - t0,  # a resumed seed counts its earlier part
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
