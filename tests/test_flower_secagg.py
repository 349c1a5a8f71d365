"""Secure aggregation on Flower through Flower's own SecAgg+ (`fedmarket.flower.secagg`): the ServerApp
reconstructs only the weighted sum, which equals the plain FedAvg aggregate within the quantisation error;
non-sum rounds are named as clear rounds. The in-memory Grid delivers every message through the real
``ClientApp`` object (so its ``secaggplus_mod`` chain runs), with each node's own Context."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Error, Message
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from test_flower_app import MemoryGrid

from fedmarket.api import run_experiment
from fedmarket.checkpoint import load_state
from fedmarket.config import config_from_dict
from fedmarket.errors import FedmarketError
from fedmarket.flower.app import client_app
from fedmarket.flower.secagg import quantization_range
from fedmarket.flower.server import FlowerServer


class AppGrid(MemoryGrid):
    """MemoryGrid whose nodes run the ClientApp object (mods included); records every reply it delivers."""

    def __init__(self, nodes):
        super().__init__(nodes)
        self.replies = []
        self.drop_at: tuple[int, str] | None = None  # (node, SecAgg+ stage): the node vanishes there

    def _drops(self, msg) -> bool:
        configs = msg.content.get("secaggplus_configs") if msg.has_content() else None
        stage = configs.get("stage") if configs is not None else None
        return self.drop_at == (msg.metadata.dst_node_id, stage)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if self._drops(msg):
                self.down.add(node)
                self.inbox[msg.metadata.message_id] = Message(
                    Error(code=0, reason="node went offline"), reply_to=msg
                )
            elif node not in self.down:
                # a copy, as if serialised: SecAgg+ sends one content object to many nodes and the mod
                # edits what it receives in place
                content = recorddict_from_proto(recorddict_to_proto(msg.content))
                try:
                    reply = client_app(Message(content, metadata=msg.metadata), self.contexts[node])
                except Exception as exc:  # what a SuperNode returns when the ClientApp raises
                    reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
                self.replies.append(reply)
                self.inbox[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(list(messages)))


pytestmark = pytest.mark.usefixtures("fresh_flower_client")


def small(tmp_path, rounds=1, **extra) -> dict:
    return {
        "name": "secagg_flower",
        "dataset": {
            "name": "synthetic",
            "markets": ["m0", "m1", "m2"],
            "options": {"num_markets": 3, "users_per_market": [50, 30, 40], "items_per_market": 40},
        },
        "method": {"name": "fedavg"},
        "model": {"hidden": [8], "embed_dim": 4},
        "train": {"rounds": rounds, "batch_size": 256},
        "eval": {"full_ranking": False, "candidates": 9},
        "output_dir": str(tmp_path / "runs"),
        "progress": False,
        **extra,
    }


def app_grid(tmp_path, name):
    return AppGrid(
        {
            100 + i: {"market": m, "state-dir": str(tmp_path / name / "state" / m)}
            for i, m in enumerate(["m0", "m1", "m2"])
        }
    )


def run(tmp_path, name, cfg_dict):
    grid = app_grid(tmp_path, name)
    run_dir = tmp_path / name / "run"
    FlowerServer(grid, config_from_dict(cfg_dict), run_dir, wait_nodes=0).run()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    aggregate = load_state(run_dir / "checkpoints" / "seed0.ckpt")["strategy"]
    return grid, metrics, aggregate


def test_secaggplus_aggregate_equals_plain_fedavg_within_quantization_error(tmp_path):
    plain_grid, _, plain = run(tmp_path, "plain", small(tmp_path))
    sa = {"enabled": True, "clipping_range": 4.0}
    grid, metrics, secure = run(tmp_path, "secure", small(tmp_path, secure_aggregation=sa))
    record = metrics["privacy"]["secure_aggregation"]
    assert record["secured_rounds"] == [1] and record["clear_rounds"] == []
    assert "SecAgg+" in record["protocol"]
    assert "Flower SecAgg+" in (tmp_path / "secure" / "run" / "report.md").read_text()
    assert not any("WARNING" in n for n in metrics["notes"])
    # the server never received a market's parameters: every reply's arrays were emptied by secaggplus_mod
    train_replies = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(train_replies) == 3 * 4  # 3 markets x 4 SecAgg+ stages
    assert all(len(a) == 0 for r in train_replies for a in r.content.array_records.values())
    # round 1 starts from the same initial parameters in both runs, so the markets' uploads are identical
    # and the aggregates differ only by SecAgg+'s quantisation: n markets x one step 2c/Q of each weighted
    # value, divided by the total weight Σ_k n_k / W (W = max_weight)
    examples = [
        int(r.content["metrics"]["num_examples"])
        for r in plain_grid.replies
        if r.metadata.message_type == "train"
    ]
    n, c, w = 3, 4.0, 100000.0
    bound = n * (2 * c / quantization_range(n)) / (sum(examples) / w) + 1e-6  # + float32 storage
    p, s = plain["global_payload"], secure["global_payload"]
    assert sorted(p) == sorted(s)
    err = max(float(np.abs(np.asarray(p[k], np.float64) - np.asarray(s[k], np.float64)).max()) for k in p)
    assert 0 < err <= bound, (err, bound)  # > 0: it did go through the quantised protocol


def test_non_sum_rounds_stay_plain_and_are_named(tmp_path):
    cfg = small(
        tmp_path,
        rounds=2,
        method={"name": "fedavg", "options": {"aggregation": "median"}},
        secure_aggregation={"enabled": True},
    )
    expected = json.loads((run_experiment(config_from_dict(cfg)) / "metrics.json").read_text())
    _, metrics, _ = run(tmp_path, "median", cfg)
    record = metrics["privacy"]["secure_aggregation"]
    assert record["secured_rounds"] == [] and record["clear_rounds"] == [1, 2]
    assert "median" in record["clear_reasons"][0]
    assert metrics["per_market"] == expected["per_market"]  # plain rounds: the same numbers as in process


def test_server_side_dp_sums_clipped_updates_through_secaggplus(tmp_path):
    privacy = {"mode": "server", "clip_norm": 0.5, "noise_multiplier": 1.0}
    cfg = small(tmp_path, rounds=2, privacy=privacy, secure_aggregation={"enabled": True})
    expected = json.loads((run_experiment(config_from_dict(cfg)) / "metrics.json").read_text())
    _, metrics, _ = run(tmp_path, "dp", cfg)
    record = metrics["privacy"]["secure_aggregation"]
    assert record["secured_rounds"] == [1, 2] and record["weights"].startswith("uniform")
    got_eps = [(r["round"], r["epsilon"], r["markets"]) for r in metrics["privacy"]["rounds"]]
    assert got_eps == [(r["round"], r["epsilon"], r["markets"]) for r in expected["privacy"]["rounds"]]
    for market, values in metrics["per_market"].items():  # same run up to SecAgg+'s quantisation
        for k, v in values.items():
            assert v == pytest.approx(expected["per_market"][market][k], abs=0.05), (market, k)


def test_values_outside_the_clipping_range_fail_loudly_instead_of_being_clipped(tmp_path):
    cfg = small(tmp_path, secure_aggregation={"enabled": True, "clipping_range": 1e-4})
    grid = app_grid(tmp_path, "clip")
    with pytest.raises(FedmarketError, match="completed SecAgg"):
        FlowerServer(grid, config_from_dict(cfg), tmp_path / "clip" / "run", wait_nodes=0).run()
    errors = [r.error.reason for r in grid.replies if r.has_error()]
    assert len(errors) == 3 and all("clipping_range" in e for e in errors)


def test_a_market_dropping_after_masking_is_recovered_by_secaggplus(tmp_path):
    plain_grid, _, _ = run(tmp_path, "plain", small(tmp_path))
    uploads = {}
    for r in plain_grid.replies:
        if r.metadata.message_type == "train":
            market = json.loads(str(r.content["fedmarket"]["json"]))["market"]
            arrays = {k: np.asarray(v.numpy(), np.float64) for k, v in r.content["arrays"].items()}
            uploads[market] = (arrays, int(r.content["metrics"]["num_examples"]))
    grid = app_grid(tmp_path, "drop")
    grid.drop_at = (102, "collect_masked_vectors")  # m2 received its shares, then vanished unmasked
    run_dir = tmp_path / "drop" / "run"
    cfg = small(tmp_path, secure_aggregation={"enabled": True, "clipping_range": 4.0})
    FlowerServer(grid, config_from_dict(cfg), run_dir, wait_nodes=0, reply_timeout=1).run()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["privacy"]["secure_aggregation"]["secured_rounds"] == [1]
    assert [(f["market"], f["error"]) for f in metrics["failures"] if f["stage"] == "fit"] == [
        ("m2", "dropped out of SecAgg+")
    ]
    got = load_state(run_dir / "checkpoints" / "seed0.ckpt")["strategy"]["global_payload"]
    survivors = [uploads["m0"], uploads["m1"]]
    total = sum(n for _, n in survivors)
    n, c, w = 2, 4.0, 100000.0
    bound = n * (2 * c / quantization_range(3)) / (total / w) + 1e-6
    for k in got:
        plain = sum(a[k] * nk for a, nk in survivors) / total
        assert np.abs(np.asarray(got[k], np.float64) - plain).max() <= bound, k


def test_fedmm_rounds_after_the_first_codebook_merge_go_through_secaggplus(tmp_path):
    from test_flower_methods import experiment

    from fedmarket.methods.fedmm import GLOBAL_CODEBOOK, GLOBAL_USAGE

    c, w = 8.0, 1000.0  # a small max_weight: finer quantisation (the weighted sums stay within c·w)
    base = experiment(tmp_path, "fedmm")
    cfg = {**base, "secure_aggregation": {"enabled": True, "clipping_range": c, "max_weight": w}}
    expected = json.loads((run_experiment(config_from_dict(cfg)) / "metrics.json").read_text())
    plain_dir = run_experiment(config_from_dict({**base, "output_dir": str(tmp_path / "plain")}))
    plain = load_state(plain_dir / "checkpoints" / "seed0.ckpt")["strategy"]
    plain = plain["state"]["rqvae"]
    markets = cfg["dataset"]["markets"]
    grid = AppGrid(
        {100 + i: {"market": m, "state-dir": str(tmp_path / "state" / m)} for i, m in enumerate(markets)}
    )
    FlowerServer(grid, config_from_dict(cfg), tmp_path / "run", wait_nodes=0).run()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    record = metrics["privacy"]["secure_aggregation"]
    # round 1 (embeddings) uploads nothing; 2 = first codebook merge (k-means over centroids: clear);
    # 3 = code-by-code merge from the sums (u·G, u, n·θ) the markets upload with weight 1; 4-5 = CTR
    assert record["secured_rounds"] == [3, 4, 5] and record["clear_rounds"] == [2]
    assert "k-means" in record["clear_reasons"][0]
    assert metrics["failures"] == []
    sim = expected["privacy"]["secure_aggregation"]  # the in-process simulation makes the same split
    assert (sim["secured_rounds"], sim["clear_rounds"]) == ([3, 4, 5], [2])
    # round 3 starts from the same state as in the plain run (round 2 is the same clear merge), so the
    # merged RQ-VAE state differs by SecAgg+'s quantisation only: each mean over the M markets is off by at
    # most 2c/round(Q/W) (weight 1 = W·(1/W), 1/W rounded to 1/Q); usage sums are integers (rounded: exact),
    # G_k = M·mean(u·G)_k / Σu_k and θ = M·mean(n·θ) / Σn
    m = len(markets)
    eps = 2 * c / round(quantization_range(m) / w)
    secure = load_state(tmp_path / "run" / "checkpoints" / "seed0.ckpt")["strategy"]
    secure = secure["state"]["rqvae"]
    assert sorted(secure) == sorted(plain)
    usage = np.asarray(plain[GLOBAL_USAGE], np.float64)
    np.testing.assert_array_equal(secure[GLOBAL_USAGE], usage)
    for key in plain:
        err = np.abs(np.asarray(secure[key], np.float64) - np.asarray(plain[key], np.float64))
        if key == GLOBAL_CODEBOOK:
            used = usage > 0
            bound = m * eps / usage[used, None] + 1e-6  # + float32 storage
            assert (err[used] <= bound).all(), (key, err[used].max())
            assert err[used].max() > 0  # it went through the quantised protocol
        elif key != GLOBAL_USAGE:
            assert err.max() <= m * eps / usage.sum() + 1e-6, (key, err.max())
    for market, values in metrics["per_market"].items():
        for k, v in values.items():
            assert v == pytest.approx(expected["per_market"][market][k], abs=0.05), (market, k)
