"""The Flower app without processes: payload ↔ ArrayRecord, the client's state store, and the ServerApp
driving real ClientApp handlers through an in-memory Grid (Prepare / Execute / Assert, no network).

The in-memory Grid delivers each message to `fedmarket.flower.client.handle` with the destination node's
own Context, exactly what a SuperNode does, so the whole server/client protocol (discovery, per-market
downloads, checks, aggregation order, best-round snapshots, test restore, failures, resume) is exercised
in seconds; `test_flower_deployment.py` runs the same over real SuperLink/SuperNode processes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict

from fedmarket.api import run_experiment
from fedmarket.config import config_from_dict
from fedmarket.errors import FedmarketError
from fedmarket.federation.driver import Driver
from fedmarket.flower import client as flower_client
from fedmarket.flower.client import StateStore, handle
from fedmarket.flower.records import payload_to_record, record_to_payload
from fedmarket.flower.server import FlowerServer, server_strategy
from fedmarket.methods import get_method


def test_payload_round_trips_through_array_record_exactly():
    rng = np.random.default_rng(0)
    payload = {
        "dnn.0.weight": rng.standard_normal((7, 3)).astype(np.float32),
        "bias": np.array([0.5], dtype=np.float32),
        "codes": rng.integers(0, 9, size=(4, 2)).astype(np.int64),
        "usage": rng.random(5),  # float64
        "scalar": np.array(3.0, dtype=np.float32),
    }
    back = record_to_payload(payload_to_record(payload))
    assert list(back) == list(payload)
    for k, v in payload.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)
        assert back[k].flags.writeable
    assert record_to_payload(payload_to_record({})) == {}


def test_state_store_picks_the_state_a_step_needs_and_prunes(tmp_path):
    store = StateStore(tmp_path / "m")
    for r in (1, 2, 3):
        store.save((r, "fit"), {"r": r})
        store.save((r, "eval"), {"r": r, "eval": True})
    assert store.tags() == [(1, "eval"), (2, "eval"), (3, "eval")]  # eval supersedes fit
    store.save((4, "fit"), {"r": 4})
    assert store.latest(3) == (3, "eval") and store.latest(4) == (4, "fit")
    store.prune(keep_round=1)
    assert store.tags() == [(1, "eval"), (3, "eval"), (4, "fit")]
    assert store.load((1, "eval"))["eval"] is True


# ------------------------------------------------------------------------------ in-memory Grid
class MemoryGrid:
    """Delivers messages to the ClientApp handler in-process; ``down`` nodes never answer."""

    def __init__(self, nodes: dict[int, dict]):
        self.nodes = nodes  # node id -> node config
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config=c, state=RecordDict(), run_config={})
            for n, c in nodes.items()
        }
        self.down: set[int] = set()
        self.inbox: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.fail_on: tuple[str, int, int] | None = None  # (kind, round, node): raise in the handler

    def get_node_ids(self):
        return [n for n in self.nodes if n not in self.down]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node not in self.down:
                req = json.loads(str(msg.content["fedmarket"]["json"]))
                if self.fail_on == (msg.metadata.message_type, req["round"], node):
                    # what a SuperNode returns when the ClientApp raises
                    reply = Message(Error(code=0, reason="ClientApp raised RuntimeError"), reply_to=msg)
                else:
                    try:
                        reply = handle(msg, self.contexts[node])
                    except Exception as exc:  # what a SuperNode returns when the ClientApp raises
                        reply = Message(Error(code=0, reason=f"ClientApp raised {exc!r}"), reply_to=msg)
                self.inbox[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.inbox.pop(m) for m in list(message_ids) if m in self.inbox]


def synthetic_cfg(tmp_path: Path, method: str = "fedavg", **train) -> dict:
    return {
        "name": f"mem_{method}",
        "dataset": {
            "name": "synthetic",
            "markets": ["m0", "m1", "m2"],
            "options": {"num_markets": 3, "users_per_market": [120, 60, 90], "items_per_market": 80},
        },
        "method": {"name": method},
        "model": {"hidden": [16]},
        "train": {"rounds": 3, "batch_size": 256, **train},
        "eval": {"full_ranking": False, "candidates": 49},
        "output_dir": str(tmp_path / "runs"),
        "progress": False,
    }


def memory_grid(tmp_path: Path, markets=("m0", "m1", "m2")) -> MemoryGrid:
    return MemoryGrid(
        {100 + i: {"market": m, "state-dir": str(tmp_path / "state" / m)} for i, m in enumerate(markets)}
    )


@pytest.fixture(autouse=True)
def _fresh_client_cache(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    # what a ServerApp process is given at start: the identity its Messages are stamped with
    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value, raising=False)
    flower_client._TRAINERS.clear()  # each test starts like a fresh ClientApp process
    yield
    flower_client._TRAINERS.clear()


def in_process(cfg_dict: dict, tmp_path: Path) -> dict:
    run = run_experiment(config_from_dict({**cfg_dict, "name": "inproc"}))
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize("method", ["fedavg", "fedper", "local"])  # fedprox: the resume test
def test_server_app_over_a_grid_equals_the_in_process_runtime(tmp_path, method):
    cfg_dict = synthetic_cfg(tmp_path, method)
    expected = in_process(cfg_dict, tmp_path)
    run_dir = tmp_path / "flower_run"
    FlowerServer(memory_grid(tmp_path), config_from_dict(cfg_dict), run_dir, wait_nodes=0).run()
    got = json.loads((run_dir / "metrics.json").read_text())
    # same seed, same arithmetic, same aggregation order: bit-identical, not just close
    assert got["per_market"] == expected["per_market"]
    assert got["communication"] == expected["communication"]
    assert got["selected_round"] == expected["selected_round"]
    for name in ("rounds.csv", "uploads.csv", "config.yaml", "report.md", "seeds/seed0.json"):
        assert (run_dir / name).exists(), name


def test_each_market_downloads_its_own_payload_and_only_declared_keys_leave(tmp_path):
    grid = memory_grid(tmp_path)
    run_dir = tmp_path / "run"
    cfg = config_from_dict(synthetic_cfg(tmp_path, "fedavg", rounds=1))
    FlowerServer(grid, cfg, run_dir, wait_nodes=0).run()
    declaration = get_method("fedavg").declaration
    trains = [m for m in grid.sent if m.metadata.message_type == "train"]
    assert sorted(m.metadata.dst_node_id for m in trains) == [100, 101, 102]
    uploads = [json.loads(k) for k in __import__("pandas").read_csv(run_dir / "uploads.csv")["keys"]]
    assert uploads and all(declaration.allows(k) for u in uploads for k in u)


def test_a_market_that_fails_is_reported_and_the_round_goes_on(tmp_path):
    grid = memory_grid(tmp_path)
    grid.fail_on = ("train", 2, 101)  # m1's ClientApp raises in round 2
    run_dir = tmp_path / "run"
    FlowerServer(grid, config_from_dict(synthetic_cfg(tmp_path)), run_dir, wait_nodes=0).run()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [(f["round"], f["market"], f["stage"]) for f in metrics["failures"]] == [(2, "m1", "fit")]
    assert set(metrics["per_market"]) == {"m0", "m1", "m2"}  # m1 still evaluated and tested
    assert metrics["communication"]["m1"]["rounds"] == 2 and metrics["communication"]["m0"]["rounds"] == 3


def test_an_undeclared_metric_never_leaves_a_market_and_a_lying_market_fails_alone(tmp_path, monkeypatch):
    from fedmarket.flower.records import METRICS
    from fedmarket.methods.ctr_trainer import CTRClient

    fit = CTRClient.fit

    def leaky_fit(self, payload, config):  # a method bug: a per-user value among the training metrics
        up = fit(self, payload, config)
        if self.market == "m1":
            up.metrics["train_user_u0_last_item"] = 17.0
        return up

    monkeypatch.setattr(CTRClient, "fit", leaky_fit)
    run_dir = tmp_path / "run"
    FlowerServer(
        memory_grid(tmp_path), config_from_dict(synthetic_cfg(tmp_path, rounds=2)), run_dir, wait_nodes=0
    ).run()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # refused on the client, before sending: m1 fails its fit steps, the others train on
    assert {(f["market"], f["stage"]) for f in metrics["failures"]} == {("m1", "fit")}
    assert "undeclared" in metrics["failures"][0]["error"]
    assert metrics["communication"]["m0"]["rounds"] == 2
    assert "user_u0" not in (run_dir / "rounds.csv").read_text()

    # a lying ClientApp that skips its own check: the server refuses the reply
    monkeypatch.setattr(CTRClient, "fit", fit)
    train = flower_client.MarketClient.train

    def lying_train(self, payload, server_round):
        content = train(self, payload, server_round)
        if self.market == "m2":
            content[METRICS]["train_user_u0_last_item"] = 17.0
        return content

    monkeypatch.setattr(flower_client.MarketClient, "train", lying_train)
    flower_client._TRAINERS.clear()
    run_dir = tmp_path / "run2"
    FlowerServer(
        memory_grid(tmp_path / "b"),
        config_from_dict(synthetic_cfg(tmp_path, rounds=2)),
        run_dir,
        wait_nodes=0,
    ).run()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {(f["market"], f["stage"]) for f in metrics["failures"]} == {("m2", "fit")}
    assert "user_u0" not in (run_dir / "rounds.csv").read_text()


def test_a_second_node_claiming_an_online_market_is_refused(tmp_path):
    grid = memory_grid(tmp_path)
    grid.nodes[103] = {"market": "m1", "state-dir": str(tmp_path / "state" / "impostor")}
    grid.contexts[103] = Context(
        run_id=1, node_id=103, node_config=grid.nodes[103], state=RecordDict(), run_config={}
    )
    run_dir = tmp_path / "run"
    FlowerServer(grid, config_from_dict(synthetic_cfg(tmp_path, rounds=2)), run_dir, wait_nodes=0).run()
    refused = json.loads((run_dir / "flower_refused_claims.json").read_text())
    assert refused == [{"node": 103, "market": "m1"}]
    trained = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"}
    assert trained == {100, 101, 102}  # the impostor is never sent work
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert not metrics["failures"]
    # the markets reported what the protocol evaluates in them (counts only)
    assert set(metrics["evaluation"]) == {"m0", "m1", "m2"} and metrics["protocol_version"] == 2
    assert all(e["evaluated_users"] > 0 for e in metrics["evaluation"].values())


def test_with_bound_nodes_only_the_registered_node_may_serve_a_market(tmp_path):
    grid = memory_grid(tmp_path)
    grid.down = {101}  # m1's registered node is away; an impostor claims m1
    grid.nodes[103] = {"market": "m1", "state-dir": str(tmp_path / "state" / "impostor")}
    grid.contexts[103] = Context(
        run_id=1, node_id=103, node_config=grid.nodes[103], state=RecordDict(), run_config={}
    )
    run_dir = tmp_path / "run"
    bound = {"m0": 100, "m1": 101, "m2": 102}
    cfg = config_from_dict(
        {**synthetic_cfg(tmp_path, rounds=1), "dataset": synthetic_cfg(tmp_path)["dataset"]}
    )
    FlowerServer(grid, cfg, run_dir, wait_nodes=0, bound_nodes=bound).run()
    refused = json.loads((run_dir / "flower_refused_claims.json").read_text())
    assert refused == [{"node": 103, "market": "m1", "reason": "not the market's registered node"}]
    assert 103 not in {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"}


def test_a_missing_node_fails_its_steps_and_a_returning_node_rejoins(tmp_path, monkeypatch):
    grid = memory_grid(tmp_path)
    run_dir = tmp_path / "run"
    server = FlowerServer(
        grid, config_from_dict(synthetic_cfg(tmp_path)), run_dir, wait_nodes=0, reply_timeout=1
    )
    original = Driver.run_round  # one round of the shared driver (after its node discovery)

    def run_round(driver, server_round):
        if server_round == 2:
            grid.down.add(101)
        original(driver, server_round)
        if server_round == 2:  # the market comes back as a NEW node on its own state folder
            grid.down.discard(101)
            grid.nodes[201] = grid.nodes.pop(101)
            grid.contexts[201] = grid.contexts.pop(101)

    monkeypatch.setattr(Driver, "run_round", run_round)
    server.run()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    failed = {(f["round"], f["market"], f["stage"]) for f in metrics["failures"]}
    assert failed == {(2, "m1", "fit"), (2, "m1", "evaluate")}
    assert metrics["communication"]["m1"]["rounds"] == 2  # rounds 1 and 3
    assert "m1" in metrics["per_market"]


def test_below_min_markets_the_round_fails(tmp_path):
    grid = memory_grid(tmp_path)
    grid.down.update({101, 102})  # only m0 ever connects
    cfg = config_from_dict(synthetic_cfg(tmp_path, min_markets=2))
    with pytest.raises(FedmarketError, match="min_markets=2"):
        FlowerServer(grid, cfg, tmp_path / "run", wait_nodes=0, reply_timeout=1).run()


def test_a_killed_server_resumes_from_its_round_checkpoint_to_the_same_numbers(tmp_path, monkeypatch):
    cfg_dict = synthetic_cfg(tmp_path, "fedprox")
    full_dir = tmp_path / "full"
    FlowerServer(memory_grid(tmp_path / "a"), config_from_dict(cfg_dict), full_dir, wait_nodes=0).run()

    grid = memory_grid(tmp_path / "b")
    killed_dir = tmp_path / "killed"
    server = FlowerServer(grid, config_from_dict(cfg_dict), killed_dir, wait_nodes=0)
    original = Driver.run_round

    def dying(driver, server_round):
        if server_round == 3:
            original(driver, server_round)  # the markets trained round 3, then the SuperLink died
            raise KeyboardInterrupt
        return original(driver, server_round)

    with monkeypatch.context() as patch:
        patch.setattr(Driver, "run_round", dying)
        with pytest.raises(KeyboardInterrupt):
            server.run()
    flower_client._TRAINERS.clear()  # and every ClientApp process with it
    FlowerServer(grid, config_from_dict(cfg_dict), killed_dir, wait_nodes=0, resume=True).run()
    full = json.loads((full_dir / "metrics.json").read_text())
    resumed = json.loads((killed_dir / "metrics.json").read_text())
    assert resumed["per_market"] == full["per_market"]
    assert resumed["communication"] == full["communication"]


def test_a_market_listed_in_join_is_not_waited_for_and_joins_when_its_node_connects(tmp_path, monkeypatch):
    """``train.join``: the run starts without m2's node; it connects after round 1, the transport adds m2 at
    the next discovery and the driver admits it at round 2, exactly as the in-process run with the same
    ``join`` (bit-identical)."""
    cfg_dict = synthetic_cfg(tmp_path, "fedavg", join={"m2": 2})
    expected = in_process(cfg_dict, tmp_path)
    grid = memory_grid(tmp_path)
    grid.down.add(102)  # m2's node is not there at the start (and is not waited for)
    original = Driver.run_round

    def run_round(driver, server_round):
        original(driver, server_round)
        grid.down.discard(102)  # m2's SuperNode connects after round 1

    monkeypatch.setattr(Driver, "run_round", run_round)
    run_dir = tmp_path / "flower_run"
    started = time.monotonic()
    FlowerServer(grid, config_from_dict(cfg_dict), run_dir, wait_nodes=120).run()
    assert time.monotonic() - started < 120  # m2 was not waited for
    got = json.loads((run_dir / "metrics.json").read_text())
    assert got["per_market"] == expected["per_market"]
    assert got["communication"] == expected["communication"]
    assert got["selected_round"] == expected["selected_round"]
    assert got["failures"] == []
    seed = json.loads((run_dir / "seeds" / "seed0.json").read_text())
    assert sorted({h["round"] for h in seed["history"] if h["market"] == "m2"}) == [2, 3]
    assert [p["joined"] for p in seed["participation"]] == [[], ["m2"], []]


def test_not_private_methods_do_not_run_on_flower(tmp_path):
    cfg = config_from_dict(synthetic_cfg(tmp_path, "centralized"))
    with pytest.raises(FedmarketError, match="not private"):
        server_strategy(get_method("centralized"), cfg, 0)


# ------------------------------------------------------------------------------ a fresh ClientApp process
CLIENT_PROCESS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import fedmarket.flower.app as app
imported = sorted(m for m in ("fedmarket.api", "fedmarket.flower.server", "fedmarket.report", "matplotlib",
                              "sklearn", "scipy", "torch._dynamo") if m in sys.modules)
from flwr.supercore.task_identity import TaskIdentity
for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
    setattr(TaskIdentity, attr, value)
import test_flower_app as t
from fedmarket.config import config_from_dict
from fedmarket.flower import client
from fedmarket.flower.server import FlowerServer

def as_client_app(msg, context):  # what flwr-clientapp calls: the app's handler for the message type
    client._TRAINERS.clear()  # and every message a fresh process: state and split from the market's disk
    client._SPLITS.clear()
    return getattr(app, msg.metadata.message_type)(msg, context)

t.handle = as_client_app
cfg = json.loads(sys.argv[2])
FlowerServer(t.memory_grid(t.Path(sys.argv[3])), config_from_dict(cfg), t.Path(sys.argv[3]) / "run",
             wait_nodes=0).run()
print(json.dumps({"imported_by_app": imported, "dynamo_after_run": "torch._dynamo" in sys.modules}))
"""


def test_a_client_app_process_skips_the_compiler_and_server_imports_with_the_same_numbers(tmp_path):
    """A ClientApp process (one per message on the Deployment Engine) imports neither the server side
    (fedmarket.api, plotting) nor torch's compiler (`skip_dynamo_import`), reads its split from the
    market's state folder after the first message, and its numbers equal the in-process run exactly."""
    import subprocess
    import sys

    cfg_dict = synthetic_cfg(tmp_path, "fedprox", rounds=2)
    expected = in_process(cfg_dict, tmp_path)
    script = tmp_path / "client_process.py"
    script.write_text(CLIENT_PROCESS)
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            str(Path(__file__).parent),
            json.dumps(cfg_dict),
            str(tmp_path / "flwr"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"imported_by_app": [], "dynamo_after_run": False}
    got = json.loads((tmp_path / "flwr" / "run" / "metrics.json").read_text())
    assert got["per_market"] == expected["per_market"]
    assert got["communication"] == expected["communication"]
    timing = json.loads((tmp_path / "flwr" / "run" / "flower_timing.json").read_text())
    messages = [r for r in timing if r["stage"] in ("train", "evaluate")]
    assert messages and all(r.get("split_from_disk") == 1.0 for r in messages)
