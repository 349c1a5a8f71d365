"""PF-MSMTrec and the multi-task baselines end to end on tiny synthetic scenarios: privacy of uploads,
personalised downloads, the fine-tune phase, every registered multi-task method runs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedmarket.api import run_seed
from fedmarket.config import config_from_dict
from fedmarket.data import load_dataset
from fedmarket.data.mtl import split_impressions
from fedmarket.federation.core import RoundConfig, Update
from fedmarket.federation.payload import UploadDeclaration
from fedmarket.federation.runtime import Simulator
from fedmarket.methods import METHODS, get_method
from fedmarket.methods.pfmsmt import PFMSMT_UPLOAD, PersonalizedStrategy

NEVER_UPLOADED = (
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "experts_scenario",
    "gates.",
    "embedding.id_",
)


class _Prepared:
    def __init__(self, splits):
        self.splits = splits


@pytest.fixture(scope="module")
def splits():
    markets = load_dataset(
        "synthetic-mtl",
        num_markets=3,
        users_per_market=40,
        items_per_market=60,
        interactions_per_user=(8, 15),
    )
    return {n: split_impressions(m) for n, m in markets.items()}


def _cfg(method: str, options: dict | None = None, rounds: int = 2) -> object:
    return config_from_dict(
        {
            "name": "t",
            "dataset": {"name": "synthetic-mtl"},
            "method": {"name": method, "options": options or {}},
            "model": {"name": "mmoe", "embed_dim": 4, "hidden": [8], "tower_hidden": [4], "num_experts": 4},
            "train": {"rounds": rounds, "batch_size": 256},
            "eval": {"select_metric": "mean_auc"},
            "progress": False,
        }
    )


def _run(cfg, splits):
    return run_seed(cfg, 0, _Prepared(splits), None, False)


SWITCHES = ("template", "fedbn", "conflict", "personalize", "towers")


@pytest.mark.parametrize("flags", list(itertools.product([True, False], repeat=2)))
def test_pfmsmt_uploads_never_hold_bn_stats_scenario_experts_or_gates(splits, flags) -> None:
    # the two switches that change what is uploaded (fedbn, towers), with every other module on
    options = {"fedbn": flags[0], "towers": flags[1]}
    result = _run(_cfg("pfmsmt", options, rounds=1), splits)
    assert result.uploads and not result.failures
    for upload in result.uploads:
        keys = list(upload["keys"])
        assert keys
        for key in keys:
            assert not any(part in key for part in NEVER_UPLOADED), key
            assert PFMSMT_UPLOAD.allows(key)
        if options["fedbn"]:
            assert not any(".bn" in k for k in keys)
        assert any(k.startswith("towers.") for k in keys) == options["towers"]
        assert any(k.startswith("experts_task.") for k in keys)


def test_scenario_experts_and_gates_exist_but_stay_local(splits) -> None:
    cfg = _cfg("pfmsmt")
    trainers, strategy = get_method("pfmsmt").build(cfg, get_method("pfmsmt").parse_options({}), splits, 0)
    client = next(iter(trainers.values()))
    names = set(client.model.state_dict())
    assert any(n.startswith("experts_scenario.") for n in names) and any(
        n.startswith("gates.") for n in names
    )
    update = client.fit(client.initial_payload(), RoundConfig(1, 1, 0, {"proximal_mu": 0.01}))
    assert not any(
        k.startswith(("experts_scenario", "gates", "embedding.id_")) or ".bn" in k for k in update.payload
    )


def test_every_ablation_runs_and_is_deterministic(splits) -> None:
    first = None
    for off in SWITCHES:
        result = _run(_cfg("pfmsmt", {off: False}), splits)
        assert not result.failures, result.failures
        assert set(result.test) == set(splits)
        assert {"ctr_auc", "ctcvr_auc", "ctr_logloss", "ctcvr_logloss"} <= set(result.test["m0"])
        if first is None:
            first = result.test
    again = _run(_cfg("pfmsmt", {"template": False}), splits)
    assert again.test == first


def test_personalised_downloads_differ_per_scenario() -> None:
    strategy = PersonalizedStrategy(tau=0.5)
    strategy.initialize({"towers.ctr.out.bias": np.zeros(2, dtype=np.float32)})
    down = strategy.configure_train(1, ["a", "b", "c"])
    assert all(np.array_equal(d["towers.ctr.out.bias"], np.zeros(2)) for d in down.values())
    ups = {
        "a": Update({"towers.ctr.out.bias": np.array([1.0, 0.0], dtype=np.float32)}, 10),
        "b": Update({"towers.ctr.out.bias": np.array([1.0, 0.0], dtype=np.float32)}, 10),
        "c": Update({"towers.ctr.out.bias": np.array([0.0, -1.0], dtype=np.float32)}, 10),
    }
    strategy.aggregate_train(1, ups)
    down = strategy.configure_train(2, ["a", "b", "c"])
    np.testing.assert_array_equal(down["a"]["towers.ctr.out.bias"], down["b"]["towers.ctr.out.bias"])
    assert not np.allclose(down["a"]["towers.ctr.out.bias"], down["c"]["towers.ctr.out.bias"])
    state = strategy.state_dict()
    other = PersonalizedStrategy(tau=0.5)
    other.load_state_dict(state)
    np.testing.assert_array_equal(
        other.configure_train(2, ["c"])["c"]["towers.ctr.out.bias"], down["c"]["towers.ctr.out.bias"]
    )


def test_fedavg_finetune_uploads_nothing_after_federated_rounds(splits) -> None:
    result = _run(_cfg("mtl_fedavg_ft", {"federated_rounds": 1}, rounds=3), splits)
    per_round = {r: [u["bytes"] for u in result.uploads if u["round"] == r] for r in (1, 2, 3)}
    assert all(b > 0 for b in per_round[1]) and all(b == 0 for b in per_round[2] + per_round[3])


@pytest.mark.parametrize("method", sorted(m for m, spec in METHODS.items() if spec.task == "mtl"))
def test_every_multitask_method_runs(splits, method) -> None:
    result = _run(_cfg(method), splits)
    assert not result.failures, result.failures
    assert set(result.test) == set(splits)
    spec = get_method(method)
    for upload in result.uploads:
        spec.declaration.check({k: None for k in upload["keys"]}, upload["market"])
        assert not any(k.startswith("embedding.id_") for k in upload["keys"])


def test_runtime_rejects_an_upload_outside_the_declaration(splits) -> None:
    cfg = _cfg("pfmsmt")
    method = get_method("pfmsmt")
    trainers, strategy = method.build(cfg, method.parse_options({}), splits, 0)
    for t in trainers.values():  # a buggy client that also sends its gates
        t.upload_declaration = UploadDeclaration(("towers.*", "gates.*"))
    sim = Simulator(
        trainers, strategy, method.declaration, rounds=1, select_metric="mean_auc", progress=False
    )
    with pytest.raises(Exception, match="only 0 market"):
        sim.run()
    assert all("undeclared" in f["error"] for f in sim.failures)


@pytest.mark.slow
def test_compare_command_writes_a_multitask_report(tmp_path) -> None:
    import yaml

    from fedmarket.cli import main

    paths = []
    for method in ("mtl_local", "pfmsmt"):
        cfg = {
            "name": f"synthetic-mtl_{method}",
            "dataset": {"name": "synthetic-mtl", "options": {"num_markets": 2, "users_per_market": 30}},
            "method": {"name": method},
            "model": {"name": "mmoe", "embed_dim": 4, "hidden": [8], "tower_hidden": [4]},
            "train": {"rounds": 1, "batch_size": 256},
            "eval": {"select_metric": "mean_auc"},
            "output_dir": str(tmp_path / "runs"),
            "progress": False,
        }
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        paths.append(str(path))
    assert main(["compare", *paths, "--out", str(tmp_path / "cmp")]) == 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "## ctr_auc" in report and "## ctcvr_auc" in report
    assert (tmp_path / "cmp" / "ctr_auc_per_market.png").is_file()
