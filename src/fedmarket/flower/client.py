"""The ClientApp side: one SuperNode is one market, running the method's own `ClientTrainer`.

The market comes from the SuperNode's node config (``--node-config 'market="de" data-dir="/data"'``) or, in
simulation, from ``partition-id`` into the experiment's market list. The client loads ONLY that market
(``load_dataset(..., markets=[market])`` + `split_for_config` with the experiment's eval settings: splits depend
only on ``eval.split_seed`` and the market, so they equal the in-process ones).

Trainer state across messages. Under the Deployment Engine with Flower's default isolation every message
starts a fresh ClientApp process (with fedmarket's long-lived ClientApp, `fedmarket.flower.worker`, one
process serves them all), so the trainer's ``state_dict`` is written to a per-market state folder after every train/evaluate step,
named by (round, stage): ``<state-dir>/<run key>/seed<S>/<market>/r00003-eval.ckpt``. A train message for round
r loads the latest state before r, an evaluate message the latest up to r, the final test the selected
round. Keying by round, not "latest", is what makes both failure paths exact: a SuperLink killed mid-round
resumes that round from the states before it, and a SuperNode restarted on the same state folder rejoins
with its own last state. (The state stays on the market's own disk; ``context.state`` would be lost with a
restarted SuperNode.) Within one process (a long-lived ClientApp, or a Ray actor in simulation) the built
trainer and the parsed market data are cached and reused whenever the cached state is the one needed, so
no data is re-read and no state re-loaded per round.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedmarket.checkpoint import load_state, save_state
from fedmarket.config import ExperimentConfig, config_from_dict
from fedmarket.data import load_dataset
from fedmarket.data.split import MarketSplit, split_for_config, split_settings
from fedmarket.errors import FedmarketError
from fedmarket.federation.core import ClientTrainer, RoundConfig
from fedmarket.flower.records import (
    ARRAYS,
    ENVELOPE,
    METRICS,
    envelope,
    open_envelope,
    payload_to_record,
    record_to_payload,
)
from fedmarket.matmul import configure_torch
from fedmarket.methods import get_method


def _process_start_time() -> float:
    """When this process started (epoch seconds): its age at the first handler = start-up + imports, which
    the Deployment Engine pays per message. From /proc on Linux (psutil is not a dependency), else this
    module's import time."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in clock ticks
    except Exception:  # pragma: no cover - not Linux
        return time.time()


_PROCESS_START = _process_start_time()
_TASK_START: float | None = None  # set by a long-lived ClientApp (fedmarket.flower.worker) per task


def task_started() -> None:
    """Called by the long-lived ClientApp when it acquires a task: ``process_age`` then measures that task
    (Flower's own pulls + FAB check + app lookup) instead of the age of the process."""
    global _TASK_START
    _TASK_START = time.time()


# ------------------------------------------------------------------------------------------ process start-up
_DYNAMO_SKIPPED = False


def skip_dynamo_import() -> int:
    """Keep a fresh ClientApp process from importing ``torch._dynamo`` (1.6 s idle, ~2.7 s on a loaded
    2-core machine: the largest part of a Deployment-Engine message's "model build" that is not Flower's).

    torch imports its compiler lazily, on the first use of an optimizer: ``Optimizer.__init__`` /
    ``state_dict`` / ``load_state_dict`` / ``zero_grad`` are wrapped by ``torch._disable_dynamo`` (which
    imports dynamo to build a "don't compile this" wrapper), ``step`` by ``_use_grad_for_differentiable``
    (which calls ``torch._dynamo.graph_break()``), the functional ``adam`` & co. by
    ``_disable_dynamo_if_unsupported``. All of these only matter under ``torch.compile``, which fedmarket
    never uses; in eager mode they call the wrapped function unchanged. So, in the ClientApp process only
    (called from `fedmarket.flower.app`'s handlers, never by the in-process runtime), each wrapper is told
    its eager function is already "disabled" (the attribute ``torch._disable_dynamo`` caches) and ``step``
    gets the same grad-mode handling without the graph breaks. Nothing numerical changes (the Deployment
    Engine tests compare its results bit for bit with the in-process runtime). No-op when dynamo is
    already imported, with ``FEDMARKET_KEEP_DYNAMO=1``, or when torch's wrappers are not the expected ones.
    Returns how many wrappers were short-circuited."""
    global _DYNAMO_SKIPPED
    import sys

    if _DYNAMO_SKIPPED or "torch._dynamo" in sys.modules or os.environ.get("FEDMARKET_KEEP_DYNAMO"):
        return 0
    _DYNAMO_SKIPPED = True
    import functools

    try:
        from torch import _compile
        from torch.optim import optimizer as optim_module

        disable_code = _compile._disable_dynamo(lambda: None).__code__
        use_grad_code = optim_module._use_grad_for_differentiable(lambda self: None).__code__
    except Exception:  # pragma: no cover - another torch: leave it alone
        return 0

    def eager_use_grad(func: Any) -> Any:
        @functools.wraps(func)
        def _use_grad(*args: Any, **kwargs: Any) -> Any:
            previous = torch.is_grad_enabled()
            try:
                torch.set_grad_enabled(args[0].defaults["differentiable"])
                return func(*args, **kwargs)
            finally:
                torch.set_grad_enabled(previous)

        return _use_grad

    count = 0
    seen: set[type] = set()
    stack: list[type] = [torch.optim.Optimizer]
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        for name, value in list(vars(cls).items()):
            code = getattr(value, "__code__", None)
            if code is disable_code and hasattr(value, "__wrapped__"):
                value.__wrapped__.__dynamo_disable = value.__wrapped__
                count += 1
            elif code is use_grad_code and hasattr(value, "__wrapped__"):
                setattr(cls, name, eager_use_grad(value.__wrapped__))
                count += 1
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("torch.optim") or module is None:
            continue
        for value in list(vars(module).values()):
            for cell in getattr(value, "__closure__", None) or ():
                try:
                    inner = cell.cell_contents
                except ValueError:
                    continue
                if getattr(inner, "__code__", None) is disable_code and hasattr(inner, "__wrapped__"):
                    inner.__wrapped__.__dynamo_disable = inner.__wrapped__
                    count += 1
    return count


# ------------------------------------------------------------------------------------------ state store
_TAG = re.compile(r"r(\d{5})-(init|fit|eval)\.ckpt$")


class StateStore:
    """A market's trainer states by (round, stage), on the market's own disk; writes are atomic."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def tags(self) -> list[tuple[int, str]]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _TAG.match(p.name)
            if m:
                out.append((int(m.group(1)), m.group(2)))
        return sorted(out)

    def latest(self, upto: int) -> tuple[int, str] | None:
        """The newest state of a round ≤ ``upto`` (eval after fit within a round)."""
        candidates = [t for t in self.tags() if t[0] <= upto]
        return max(candidates, key=lambda t: (t[0], t[1] == "eval")) if candidates else None

    def path(self, tag: tuple[int, str]) -> Path:
        return self.root / f"r{tag[0]:05d}-{tag[1]}.ckpt"

    def save(self, tag: tuple[int, str], state: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        save_state(self.path(tag), state, keep_previous=False)
        if tag[1] == "eval":  # the evaluated state supersedes the round's post-fit state
            self.path((tag[0], "fit")).unlink(missing_ok=True)

    def load(self, tag: tuple[int, str]) -> dict[str, Any]:
        return load_state(self.path(tag))

    def prune(self, keep_round: int) -> None:
        """Keep the two newest rounds (a resumed round needs the one before it) and ``keep_round`` (the
        best so far, which the final test may restore)."""
        rounds = sorted({r for r, _ in self.tags()})
        keep = set(rounds[-2:]) | {keep_round}
        for tag in self.tags():
            if tag[0] not in keep:
                self.path(tag).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ the market
@dataclass
class _Cached:
    trainer: ClientTrainer
    tag: tuple[int, str]


_SPLITS: dict[str, MarketSplit] = {}
_TRAINERS: dict[tuple[str, int, str], _Cached] = {}
_CONFIGS: dict[str, ExperimentConfig] = {}
# a long-lived process (a Ray worker, fedmarket.flower.worker) serves run after run: keep the newest few
_MAX_CACHED = 4


@dataclass
class Timing:
    """Where a client's time goes in one message (reported to the server, which writes it per round)."""

    process_age: float = 0.0  # seconds since this process started, at handler entry
    data: float = 0.0  # reading + splitting the market's data (0 when cached)
    build: float = 0.0  # building the trainer (model init)
    state_load: float = 0.0
    state_save: float = 0.0
    compute: float = 0.0  # fit / evaluate proper
    cache_hit: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items() if k != "extra"} | self.extra


def experiment_config(text: str) -> ExperimentConfig:
    if text not in _CONFIGS:
        _CONFIGS[text] = config_from_dict(json.loads(text))
        while len(_CONFIGS) > _MAX_CACHED:
            del _CONFIGS[next(iter(_CONFIGS))]
    return _CONFIGS[text]


def resolve_market(node_config: dict[str, Any], cfg: ExperimentConfig) -> str:
    """``market`` from the node config, else ``partition-id`` into ``dataset.markets`` (simulation)."""
    if "market" in node_config:
        return str(node_config["market"])
    if "partition-id" in node_config:
        markets = cfg.dataset.markets
        if not markets:
            raise FedmarketError("simulation needs dataset.markets listed: partition-id indexes that list")
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(markets):
            raise FedmarketError(f"partition-id {pid} outside dataset.markets {markets}")
        return markets[pid]
    raise FedmarketError("SuperNode has no market: start it with --node-config 'market=\"<name>\"'")


def market_split(
    cfg: ExperimentConfig, market: str, data_dir: str | None, timing: Timing, cache_dir: Path | None = None
) -> MarketSplit:
    """This market's split: from this process's memory, else from ``cache_dir`` (the market's own state
    folder: a Deployment-Engine message runs in a fresh process, and re-reading and re-splitting a large
    market costs ~0.5 s a message, unpickling it ~1 ms), else loaded and split (then written there).
    The file name carries a digest of everything the split depends on, so a changed config never reads
    a stale one."""
    d = cfg.dataset
    key = json.dumps(
        [d.name, market, data_dir, d.options, *split_settings(cfg.eval)],
        sort_keys=True,
        default=str,
    )
    if key not in _SPLITS:
        t0 = time.perf_counter()
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        path = cache_dir / f"split-{market}-{digest}.pkl" if cache_dir is not None else None
        if path is not None and path.exists():
            with path.open("rb") as f:
                _SPLITS[key] = pickle.load(f)
            timing.extra["split_from_disk"] = 1.0
        else:
            markets = load_dataset(
                d.name, data_dir=data_dir, markets=[market], use_cache=d.use_cache, **d.options
            )
            if market not in markets:
                raise FedmarketError(f"dataset {d.name!r} has no market {market!r}")
            _SPLITS[key] = split_for_config(markets[market], cfg.eval)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                with tmp.open("wb") as f:
                    pickle.dump(_SPLITS[key], f, protocol=pickle.HIGHEST_PROTOCOL)
                os.replace(tmp, path)  # atomic: a concurrent or killed writer never leaves a torn file
        timing.data = time.perf_counter() - t0
        while len(_SPLITS) > _MAX_CACHED:  # a long-lived process: the oldest splits go first
            del _SPLITS[next(iter(_SPLITS))]
    return _SPLITS[key]


class MarketClient:
    """Serves one message for this node's market: finds or rebuilds the trainer at the needed state."""

    def __init__(self, request: dict[str, Any], context: Context) -> None:
        self.timing = Timing(process_age=time.time() - (_TASK_START or _PROCESS_START))
        self.request = request
        self.cfg = experiment_config(request["experiment"])
        node = dict(context.node_config)
        self.market = resolve_market(node, self.cfg)
        self.data_dir = str(node["data-dir"]) if "data-dir" in node else self.cfg.dataset.data_dir
        self.seed = int(request["seed"])
        state_root = (
            node.get("state-dir")
            or request.get("state_dir")
            or os.path.join(os.environ.get("FLWR_HOME") or tempfile.gettempdir(), "fedmarket-state")
        )
        self.store = StateStore(Path(str(state_root)) / request["key"] / f"seed{self.seed}" / self.market)
        self.split_cache = Path(str(state_root)) / request["key"]  # the market's split, shared by seeds
        self.cache_key = (request["key"], self.seed, self.market)
        # what may leave this market: uploads and metrics (checked before anything is sent)
        self.declaration = get_method(self.cfg.method.name).declaration_for(self.cfg)

    def _fresh_trainer(self) -> ClientTrainer:
        split = market_split(self.cfg, self.market, self.data_dir, self.timing, self.split_cache)
        t0 = time.perf_counter()
        method = get_method(self.cfg.method.name)
        opts = method.parse_options(self.cfg.method.options)
        configure_torch(self.cfg.train.threads, self.cfg.train.matmul)
        trainers, _ = method.build(self.cfg, opts, {self.market: split}, self.seed)
        if set(trainers) != {self.market}:
            raise FedmarketError(
                f"method {self.cfg.method.name!r} built trainers {sorted(trainers)} for market {self.market!r}"
            )
        self.timing.build = time.perf_counter() - t0
        return trainers[self.market]

    def trainer_at(self, tag: tuple[int, str] | None) -> ClientTrainer:
        """The trainer holding state ``tag`` (None: freshly initialised).

        The trainer is taken OUT of the cache while a message uses it (fit and evaluate change it) and put
        back by `keep` / `save` with the state it then holds, so a message that fails halfway, or one that
        changes the model without saving it (a test evaluation loading a payload), never leaves a cached
        trainer whose tag is not its state: a long-lived process then rebuilds it from the state folder."""
        wanted = tag or (0, "init")
        cached = _TRAINERS.pop(self.cache_key, None)
        if cached is not None and cached.tag == wanted:
            self.timing.cache_hit = 1
            return cached.trainer
        trainer = cached.trainer if cached is not None and tag is not None else self._fresh_trainer()
        configure_torch(self.cfg.train.threads, self.cfg.train.matmul)
        if tag is not None:
            t0 = time.perf_counter()
            trainer.load_state_dict(self.store.load(tag))
            self.timing.state_load = time.perf_counter() - t0
        return trainer

    def keep(self, trainer: ClientTrainer, tag: tuple[int, str]) -> None:
        """Cache ``trainer``, which holds state ``tag`` (see `trainer_at`)."""
        _TRAINERS.pop(self.cache_key, None)
        _TRAINERS[self.cache_key] = _Cached(trainer, tag)
        while len(_TRAINERS) > _MAX_CACHED:  # the oldest first (dicts keep insertion order)
            del _TRAINERS[next(iter(_TRAINERS))]

    def save(self, trainer: ClientTrainer, tag: tuple[int, str], keep_round: int) -> None:
        t0 = time.perf_counter()
        self.store.save(tag, trainer.state_dict())
        self.store.prune(keep_round)
        self.keep(trainer, tag)
        self.timing.state_save = time.perf_counter() - t0

    # ---------------------------------------------------------------- the three message kinds
    def hello(self, want_initial: bool) -> RecordDict:
        split = market_split(self.cfg, self.market, self.data_dir, self.timing, self.split_cache)
        # what the protocol evaluates in this market (counts only; metrics.json -> evaluation)
        evaluation = split.evaluation_summary() if hasattr(split, "evaluation_summary") else {}
        content = RecordDict(
            {ENVELOPE: envelope(market=self.market, timing=self.timing.as_dict(), evaluation=evaluation)}
        )
        if want_initial:
            trainer = self.trainer_at(None)
            content[ARRAYS] = payload_to_record(trainer.initial_payload())
            self.keep(trainer, (0, "init"))  # reading the initial payload leaves the model as it was
        return content

    def train(self, payload: dict, server_round: int) -> RecordDict:
        trainer = self.trainer_at(self.store.latest(server_round - 1))
        req = self.request
        config = RoundConfig(server_round, int(req["local_epochs"]), self.seed, dict(req.get("options", {})))
        t0 = time.perf_counter()
        # the same market-side wrappers as in process (attack simulation, DP clipping / local noise)
        from fedmarket.api import protect_trainer  # here: query/evaluate messages never import fedmarket.api

        update = protect_trainer(self.cfg, trainer).fit(payload, config)
        self.timing.compute = time.perf_counter() - t0
        self.save(trainer, (server_round, "fit"), int(req.get("keep_round", 0)))
        metrics = MetricRecord({"num_examples": int(update.num_examples)})
        # only declared metric keys leave the market, checked here before sending (and again on the server)
        for k, v in self.declaration.check_metrics(update.metrics, self.market, "training metric").items():
            metrics[k] = v
        return RecordDict(
            {
                ARRAYS: payload_to_record(update.payload),
                METRICS: metrics,
                ENVELOPE: envelope(market=self.market, timing=self.timing.as_dict()),
            }
        )

    def evaluate(self, payload: dict, server_round: int) -> RecordDict:
        req = self.request
        split = req["split"]
        if split == "test":
            restore = int(req.get("restore_round", 0))
            tag = self.store.latest(restore if restore > 0 else server_round)
            if restore > 0 and (tag is None or tag[0] != restore):
                raise FedmarketError(f"market {self.market}: no saved state of selected round {restore}")
        else:
            tag = self.store.latest(server_round)
        trainer = self.trainer_at(tag)
        t0 = time.perf_counter()
        metrics = trainer.evaluate(payload or None, split, full_ranking=bool(req.get("full_ranking", False)))
        metrics = {m: self.declaration.check_metrics(v, m, f"{split} metric") for m, v in metrics.items()}
        self.timing.compute = time.perf_counter() - t0
        if split == "valid":  # the evaluated state (payload loaded) is what a best round restores
            self.save(trainer, (server_round, "eval"), int(req.get("keep_round", 0)))
        return RecordDict(
            {ENVELOPE: envelope(market=self.market, metrics=metrics, timing=self.timing.as_dict())}
        )


def handle(msg: Message, context: Context) -> Message:
    """The ClientApp's one handler body for ``query`` / ``train`` / ``evaluate`` messages."""
    t0 = time.perf_counter()
    request = open_envelope(msg.content[ENVELOPE])
    client = MarketClient(request, context)
    payload = record_to_payload(msg.content[ARRAYS]) if ARRAYS in msg.content else {}
    kind = msg.metadata.message_type.split(".")[0]
    if kind == "query":
        content = client.hello(bool(request.get("want_initial", False)))
    elif kind == "train":
        content = client.train(payload, int(request["round"]))
    elif kind == "evaluate":
        content = client.evaluate(payload, int(request["round"]))
    else:
        raise FedmarketError(f"unknown message type {msg.metadata.message_type!r}")
    timing = open_envelope(content[ENVELOPE])
    timing["timing"]["handler"] = time.perf_counter() - t0
    content[ENVELOPE] = envelope(**timing)
    return Message(content=content, reply_to=msg)
