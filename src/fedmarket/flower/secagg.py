"""Secure aggregation on Flower with Flower's own SecAgg+ (``SecAggPlusWorkflow`` + ``secaggplus_mod``).

What the ServerApp sees. In a round whose server step is a weighted sum (the FedAvg family's example-weighted
mean, FedMM's non-RQ-VAE rounds, and every round under server-side DP, where the sum is of clipped updates:
the strategy's `Strategy.step_kind` decides, as in process), the train step of the round `Driver`'s Flower
transport is Flower's SecAgg+ protocol (`secure_train`) instead of one plain ``train`` message per market:
each market uploads [w_k, w_k·θ_k] quantised
and masked (pairwise masks from Diffie-Hellman keys plus a private mask, both secret-shared among the
markets with Shamir shares, so a market that drops after masking is recovered from the survivors' shares),
and the server reconstructs only Σ w_k θ_k / Σ w_k. That value goes to the driver, and through it to the
method's own `Strategy`, as every surviving market's (secured) upload, so a strategy whose server step is the weighted mean of its inputs returns
it unchanged (and `PrivateStrategy` in ``mode: server`` recovers Σ_k Δ̄_k from it, adds its noise and
accounts as usual; there w_k = 1, uniform, as its sensitivity needs). Rounds whose server step is not a
sum (coordinate-wise median / trimmed mean, personalised aggregation, FedMM's first codebook merge by
k-means) run the plain train step and are listed, with the reason, as clear rounds in the run's privacy
record. FedMM's later RQ-VAE rounds are sums: its markets upload u·G, u and n·θ with example count 1, so
the weight is 1/W for every market, the aggregate is their mean, and the strategy sums the survivors'
copies of it.

What still travels in the clear, as in Flower's SecAgg+: each market's example count (FitRes.num_examples,
which SecAgg+ uses as the weight) and its training metrics (loss, ``dp_update_norm``).

Quantisation (Flower's): each weighted value is clipped to [-c, c] (``secure_aggregation.clipping_range``)
and stochastically rounded to Q levels, Q the largest power of two with n·Q < 2^32 (n markets, so the
masked sum never wraps modulo 2^32) and Q ≤ 2^30; the weight w_k / W (W = ``secure_aggregation.max_weight``)
is rounded to 1/Q. Error of the mean per coordinate ≤ n · (2c/Q) / Σ_k (w_k/W). Silent clipping would bias
the aggregate, so a market whose weighted update leaves [-c, c] or whose example count exceeds W fails
its round with a message naming the setting instead. The stochastic rounding draws from numpy's global
generator, which the market seeds from (seed, market, round), so runs repeat exactly.

Client side: `secaggplus_when_asked` (a ClientApp mod on ``train``) hands SecAgg+ stage messages to
``secaggplus_mod`` and lets every other train message through untouched; the mod's call into the app is
bridged from Flower's legacy FitIns/FitRes records to fedmarket's own train message, so the market runs
exactly the same handler (and the same DP / attack wrappers) as in a plain round.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from fedmarket.data.split import market_seed
from fedmarket.errors import FedmarketError
from fedmarket.federation.driver import Failure, Reply, TrainOutcome, TrainRequest
from fedmarket.federation.payload import Payload, validate_num_examples, validate_update
from fedmarket.flower.records import (
    ARRAYS,
    ENVELOPE,
    METRICS,
    envelope,
    open_envelope,
    payload_to_record,
    record_to_payload,
)
from fedmarket.serialization import json_default

if TYPE_CHECKING:
    from fedmarket.flower.server import FlowerTransport

log = logging.getLogger(__name__)

LEGACY_KEY = "fedmarket"  # FitIns.config entry holding fedmarket's request envelope (JSON)
LAYOUT_KEY = "__fedmarket_layout__"  # FitRes.metrics entry: [[key, dtype], ...] of the summed arrays
MODULUS = 2**32  # Flower's default SecAgg+ modulus (its masks are drawn below 2^32)
PROTOCOL = "Flower SecAgg+ (flwr.server.workflow.SecAggPlusWorkflow + flwr.client.mod.secaggplus_mod)"


def quantization_range(markets: int) -> int:
    """Largest power of two Q with markets·Q < 2^32 (the masked sum must not wrap) and Q ≤ 2^30 (Flower
    rounds through int32)."""
    q = 2**30
    while markets * q >= MODULUS and q > 1:
        q //= 2
    return q


def uniform_weights(cfg: Any) -> bool:
    """Server-side DP needs the plain sum of clipped updates (sensitivity C per market): weight 1 each."""
    return cfg.privacy.mode == "server"


# ------------------------------------------------------------------------------------------ client side
def secaggplus_when_asked(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """ClientApp mod for ``train``: SecAgg+ stage messages (they carry Flower's ``secaggplus_configs``
    record) go through ``secaggplus_mod``; fedmarket's own train messages pass untouched."""
    if RECORD_KEY_CONFIGS not in msg.content:
        return call_next(msg, ctxt)
    return secaggplus_mod(msg, ctxt, _bridge(call_next))


def _bridge(call_next: Any) -> Any:
    """secaggplus_mod calls the app with a legacy FitIns message and expects a FitRes reply: translate to and
    from fedmarket's train message, and refuse (loudly) what SecAgg+ would silently clip."""

    def call(msg: Message, ctxt: Context) -> Message:
        from fedmarket.flower.client import experiment_config
        from fedmarket.methods import get_method

        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        request = json.loads(str(fitins.config[LEGACY_KEY]))
        spec = request.pop("secagg")
        keys = list(spec["keys"])
        download = dict(zip(keys, parameters_to_ndarrays(fitins.parameters), strict=True))
        msg.content = RecordDict({ENVELOPE: envelope(**request), ARRAYS: payload_to_record(download)})
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        upload = record_to_payload(reply.content[ARRAYS])
        metrics = dict(reply.content[METRICS])
        body = open_envelope(reply.content[ENVELOPE])
        market = body["market"]
        cfg = experiment_config(request["experiment"])
        # the checks the server makes on a plain upload, made here (the server never sees this one)
        num_examples = validate_num_examples(
            metrics.pop("num_examples", None), market, cfg.train.max_examples, uploaded=bool(upload)
        )
        declaration = get_method(cfg.method.name).declaration_for(cfg)
        declaration.check(upload, market)
        declaration.check_metrics(metrics, market, "training metric")
        validate_update(upload, request.get("contract") or None, market)
        up_keys = sorted(upload)
        for k in up_keys:
            if np.asarray(upload[k]).dtype.kind != "f":
                raise FedmarketError(f"market {market!r}: {k!r} is not floating point; SecAgg+ sums floats")
        weight = 1 if spec["uniform"] else num_examples
        max_weight = float(spec["max_weight"])
        if weight > max_weight:
            raise FedmarketError(
                f"market {market!r}: {weight} examples > secure_aggregation.max_weight={max_weight:g} "
                "(SecAgg+ would cap the weight); raise it"
            )
        vectors = [np.asarray(upload[k], dtype=np.float64) for k in up_keys]
        peak = max((float(np.abs(v).max(initial=0.0)) for v in vectors), default=0.0) * weight / max_weight
        if peak > float(spec["clipping_range"]):
            raise FedmarketError(
                f"market {market!r}: a weighted value of {peak:.4g} is outside secure_aggregation."
                f"clipping_range={spec['clipping_range']:g} (SecAgg+ would clip it); raise it"
            )
        # SecAgg+ rounds stochastically with numpy's global generator: seed it so runs repeat
        ss = market_seed(int(request["seed"]), f"__secaggplus__{market}", int(request["round"]))
        np.random.seed(int(ss.generate_state(1)[0]))
        fitres = FitRes(
            status=Status(code=Code.OK, message=""),
            parameters=ndarrays_to_parameters(vectors),
            num_examples=weight,
            # names and dtypes of the summed arrays (the server sees their shapes in the sum)
            metrics={k: float(v) for k, v in metrics.items()}
            | {LAYOUT_KEY: json.dumps([[k, np.asarray(upload[k]).dtype.str] for k in up_keys])},
        )
        content = compat.fitres_to_recorddict(fitres, keep_input=True)
        content[ENVELOPE] = reply.content[ENVELOPE]
        return Message(content, reply_to=msg)

    return call


# ------------------------------------------------------------------------------------------ server side
class _OneRound(LegacyStrategy):
    """The legacy-Strategy face SecAggPlusWorkflow needs: hands out fedmarket's FitIns per node and keeps
    what the workflow reconstructs (the aggregate, plus each survivor's FitRes metadata)."""

    def __init__(self, fitins: dict[int, FitIns], grid: Any) -> None:
        self.fitins = fitins
        self.grid = grid
        self.results: list[tuple[Any, FitRes]] | None = None

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return [(GridClientProxy(node, self.grid, 0), ins) for node, ins in self.fitins.items()]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Any, dict]:
        self.results = list(results)
        return (results[0][1].parameters if results else None), {}

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None


def secure_train(
    transport: FlowerTransport,
    seed: int,
    server_round: int,
    requests: dict[str, TrainRequest],
    why: str,
) -> TrainOutcome:
    """The train step of a weighted-sum round through SecAgg+ (`fedmarket.flower.server.FlowerTransport`
    calls it when the strategy's `Strategy.step_kind` says sum and at least 2 markets are reachable;
    ``why`` is its reason). Every surviving market's reply is the reconstructed aggregate, marked
    ``secured`` (the market checked its own upload before masking, see `_bridge`); a market without a node
    or that dropped out fails; the outcome's ``secure`` is the round's entry in the privacy record."""
    cfg = transport.cfg
    nodes = transport.nodes
    reachable = [m for m in requests if m in nodes]
    uniform = uniform_weights(cfg)
    max_weight = 1.0 if uniform else float(cfg.secure_aggregation.max_weight)
    q = quantization_range(len(reachable))
    spec = {
        "uniform": uniform,
        "max_weight": max_weight,
        "clipping_range": cfg.secure_aggregation.clipping_range,
    }
    replies: dict[str, Reply | Failure] = {}
    fitins, node_market = {}, {}
    for market, req in requests.items():
        if market not in nodes:
            replies[market] = Failure("no SuperNode connected for this market")
            continue
        down = req.download
        keys = sorted(down)
        request = transport.request(
            seed,
            server_round,
            local_epochs=req.config.local_epochs,
            options=req.config.options,
            keep_round=req.keep_round,
            secagg={**spec, "keys": keys},
            contract={k: list(v) for k, v in req.contract.items()},
        )
        node = nodes[market]
        fitins[node] = FitIns(
            ndarrays_to_parameters([np.asarray(down[k]) for k in keys]),
            {LEGACY_KEY: json.dumps(request, default=json_default)},
        )
        node_market[node] = market
    shim = _OneRound(fitins, transport.grid)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=cfg.train.rounds),
        strategy=shim,
    )
    context.state[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    context.state[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every market shares its keys with every other
        reconstruction_threshold=0.5,  # shares needed to unmask: half of them, at least 2
        max_weight=max_weight,
        clipping_range=cfg.secure_aggregation.clipping_range,
        quantization_range=q,
        modulus_range=MODULUS,
        timeout=transport.reply_timeout,
    )
    workflow(transport.grid, context)
    results = shim.results or []
    if not results:
        raise FedmarketError(
            f"round {server_round}: no market completed SecAgg+ (it halted: too few markets answered); "
            f"markets asked: {list(node_market.values())}"
        )
    survivors = {node_market[proxy.node_id]: res for proxy, res in results}
    layouts = {str(res.metrics.pop(LAYOUT_KEY, "")) for _, res in results}
    if len(layouts) != 1:
        raise FedmarketError(f"round {server_round}: markets summed different arrays: {sorted(layouts)}")
    layout = json.loads(layouts.pop())
    arrays = parameters_to_ndarrays(results[0][1].parameters)
    aggregate: Payload = {
        k: np.asarray(a, dtype=np.dtype(dt)) for (k, dt), a in zip(layout, arrays, strict=True)
    }
    for market in node_market.values():
        res = survivors.get(market)
        if res is None:
            replies[market] = Failure("dropped out of SecAgg+")
            continue
        # every survivor "uploads" the aggregate (the masked upload has its shape): a weighted mean of
        # identical inputs returns it
        replies[market] = Reply(aggregate, int(res.num_examples), dict(res.metrics), secured=True)
    secure = {"secure": True, "reason": why, "markets": len(survivors), "quantization_range": q}
    return TrainOutcome({m: replies[m] for m in requests}, secure)


def secure_aggregation_report(cfg: Any, record: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's ``privacy.secure_aggregation`` entry (the report's privacy section reads it)."""
    clear = [r for r in record if not r["secure"]]
    return {
        "secure_aggregation": {
            "protocol": PROTOCOL,
            "clipping_range": cfg.secure_aggregation.clipping_range,
            "max_weight": 1.0 if uniform_weights(cfg) else cfg.secure_aggregation.max_weight,
            "weights": "uniform (server-side DP)" if uniform_weights(cfg) else "example counts",
            "secured_rounds": [r["round"] for r in record if r["secure"]],
            "clear_rounds": [r["round"] for r in clear],
            "clear_reasons": sorted({r["reason"] for r in clear}),
            "what": "the server reconstructs only Σ w_k θ_k / Σ w_k; example counts and training metrics "
            "travel in the clear",
        }
    }
