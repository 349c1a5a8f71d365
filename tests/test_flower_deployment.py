"""Real Flower processes on 127.0.0.1 (SuperLink + one SuperNode per market, or the simulation SuperLink):
equivalence with the in-process runtime, TLS (and refusal of a wrong or missing CA), a SuperNode killed
mid-run. XMarket in + jp, 2 rounds. Every process is started by the test's `LocalFederation` and stopped
by pid; each test asserts that nothing it started is left running.

Tolerance for equivalence: exact equality. The same seed gives the same arithmetic on both runtimes: the
ClientTrainer is the same code on the same single-market data (splits depend only on the split seed and
the market), randomness is derived from (seed, market, round, epoch), payloads cross as bit-exact arrays,
the server aggregates in market order, and torch runs with the same 1 intra-op thread. A reordering of the
float sums would show up as ~1e-7 differences; none is expected, so none is allowed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedmarket.api import run_experiment
from fedmarket.config import config_from_dict
from fedmarket.flower.launch import (
    FLOWER_ENV,
    LocalFederation,
    make_certificates,
    prepare_flower_run,
    processes_with_env,
    run_on_flower,
    wait_for_run,
    write_app_dir,
)

pytestmark = pytest.mark.slow


def xmrec_cfg(tmp_path: Path, data_dir: Path, name: str, **train) -> dict:
    return {
        "name": name,
        "dataset": {"name": "xmrec", "markets": ["in", "jp"], "data_dir": str(data_dir)},
        "method": {"name": "fedavg"},
        "train": {"rounds": 2, "batch_size": 512, **train},
        "output_dir": str(tmp_path / "runs"),
        "progress": False,
    }


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, data_dir) -> dict:
    tmp = tmp_path_factory.mktemp("inproc")
    return metrics(run_experiment(config_from_dict(xmrec_cfg(tmp, data_dir, "inproc"))))


def assert_same_results(got: dict, expected: dict) -> None:
    assert got["per_market"] == expected["per_market"]  # exact: see the module docstring
    assert got["communication"] == expected["communication"]
    assert got["selected_round"] == expected["selected_round"]
    assert got["failures"] == []


def test_deployment_over_tls_equals_in_process_and_refuses_a_wrong_or_missing_ca(
    tmp_path, data_dir, in_process
):
    cfg, run_dir = prepare_flower_run(config_from_dict(xmrec_cfg(tmp_path, data_dir, "tls")), None, False)
    with LocalFederation(run_dir / "flower", tls=True) as fed:
        fed.start_superlink()
        for market in ("in", "jp"):
            fed.start_supernode(market, data_dir=str(data_dir))
        wrong_ca = make_certificates(tmp_path / "other-ca").ca
        rogues = {
            "rogue-wrong-ca": fed.start_supernode(
                "in", root_certificates=wrong_ca, max_wait_time=20, name="rogue-wrong-ca"
            ),
            "rogue-no-ca": fed.start_supernode(
                "in", root_certificates=None, max_wait_time=20, name="rogue-no-ca"
            ),
        }
        proc = fed.submit(write_app_dir(fed.home / "app"), {"run-dir": str(run_dir)})
        wait_for_run(fed, proc, run_dir, timeout=300)
        for name, rogue in rogues.items():
            rogue.wait(30)  # gives up after --max-wait-time without ever connecting
            log = fed.log_tail(name, 20000)
            assert rogue.returncode != 0, log
            assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log, log
        leftovers = fed
    assert leftovers.leftover_pids() == []
    assert_same_results(metrics(run_dir), in_process)


def test_a_killed_supernode_is_reported_the_run_finishes_and_a_restarted_one_rejoins(tmp_path, data_dir):
    cfg, run_dir = prepare_flower_run(config_from_dict(xmrec_cfg(tmp_path, data_dir, "kill")), None, False)
    with LocalFederation(run_dir / "flower") as fed:
        fed.start_superlink()
        for market in ("in", "jp"):
            fed.start_supernode(market, data_dir=str(data_dir))
        proc = fed.submit(
            write_app_dir(fed.home / "app"), {"run-dir": str(run_dir), "reply-timeout": 30.0}
        )  # generous: a loaded machine takes ~12 s a step
        progress = run_dir / "flower_progress.json"
        deadline = time.monotonic() + 200
        while not (progress.exists() and json.loads(progress.read_text())["round"] >= 1):
            assert time.monotonic() < deadline and proc.poll() is None, fed.log_tail("flwr-run")
            time.sleep(0.2)
        fed.stop("supernode-jp", sig=signal.SIGKILL)  # round 2 has just started
        time.sleep(3)
        fed.restart("supernode-jp")  # same market, same state folder, a new node id
        wait_for_run(fed, proc, run_dir, timeout=300)
        leftovers = fed
    assert leftovers.leftover_pids() == []
    result = metrics(run_dir)
    assert {(f["round"], f["market"], f["stage"]) for f in result["failures"]} == {
        (2, "jp", "fit"),
        (2, "jp", "evaluate"),
    }
    assert result["communication"]["jp"]["rounds"] == 1 and result["communication"]["in"]["rounds"] == 2
    assert set(result["per_market"]) == {"in", "jp"}  # the rejoined node restored its round-1 state
    assert result["selected_round"]["0"]["jp"] == 1


def test_flower_simulation_writes_the_same_run_folder_and_numbers(tmp_path, data_dir, in_process):
    run_dir = run_on_flower(config_from_dict(xmrec_cfg(tmp_path, data_dir, "sim")), "simulation", timeout=300)
    assert_same_results(metrics(run_dir), in_process)
    for name in ("config.yaml", "rounds.csv", "uploads.csv", "report.md", "seeds/seed0.json"):
        assert (run_dir / name).exists(), name


def test_a_market_joining_later_on_the_deployment_engine_takes_part_from_its_round(tmp_path):
    """``train.join``: the run starts with the SuperNodes of m0 and m1 only (m2 is not waited for); m2's
    SuperNode is started once round 1 is done, and the driver admits m2 at the first round whose discovery
    sees its node (2, or 3 on a slow machine). m2 then has validation rows from that round on only and a test
    metric at the end, and the whole run equals the in-process run with m2 joining at that round exactly."""
    cfg_dict = {
        "name": "late_join",
        "dataset": {
            "name": "synthetic",
            "markets": ["m0", "m1", "m2"],
            "options": {"num_markets": 3, "users_per_market": [60, 40, 50], "items_per_market": 60},
        },
        "method": {"name": "fedavg"},
        "model": {"hidden": [16]},
        "train": {"rounds": 3, "batch_size": 256, "join": {"m2": 2}},
        "eval": {"full_ranking": False, "candidates": 20},
        "output_dir": str(tmp_path / "runs"),
        "progress": False,
    }
    cfg, run_dir = prepare_flower_run(config_from_dict(cfg_dict), None, False)
    with LocalFederation(run_dir / "flower") as fed:
        fed.start_superlink()
        for market in ("m0", "m1"):
            fed.start_supernode(market)
        proc = fed.submit(write_app_dir(fed.home / "app"), {"run-dir": str(run_dir), "reply-timeout": 60.0})
        progress = run_dir / "flower_progress.json"
        deadline = time.monotonic() + 120
        while not (progress.exists() and json.loads(progress.read_text())["round"] >= 1):
            assert time.monotonic() < deadline and proc.poll() is None, fed.log_tail("flwr-run")
            time.sleep(0.2)
        fed.start_supernode("m2")  # round 1 is done: m2's node connects now
        wait_for_run(fed, proc, run_dir, timeout=180)
        leftovers = fed
    assert leftovers.leftover_pids() == []
    result = metrics(run_dir)
    seed = json.loads((run_dir / "seeds" / "seed0.json").read_text())
    assert result["failures"] == []
    joined = [p["round"] for p in seed["participation"] if "m2" in p["joined"]]
    assert len(joined) == 1 and joined[0] in (2, 3), seed["participation"]
    valid_rounds = sorted({h["round"] for h in seed["history"] if h["market"] == "m2"})
    assert valid_rounds == list(range(joined[0], 4))  # validation rows from its join round on only
    assert seed["participation"][0]["markets"] == ["m0", "m1"]
    assert "auc" in result["per_market"]["m2"] and result["selected_round"]["0"]["m2"] >= joined[0]
    assert result["communication"]["m2"]["rounds"] == 4 - joined[0]
    # the same numbers as in process with m2 joining at that round (the run's arithmetic does not depend on
    # when its node connected, only on the round it was admitted)
    inproc = {**cfg_dict, "name": "inproc", "train": {**cfg_dict["train"], "join": {"m2": joined[0]}}}
    expected = metrics(run_experiment(config_from_dict(inproc)))
    assert_same_results(result, expected)


# ------------------------------------------------------------------------------ a multi-stage method
FEDMM_SYNTHETIC = {
    "name": "fedmm_deploy",
    "dataset": {
        "name": "synthetic",
        "markets": ["m0", "m1"],
        "options": {
            "num_markets": 2,
            "users_per_market": [60, 40],
            "items_per_market": 60,
            "interactions_per_user": [5, 8],
        },
    },
    "method": {
        "name": "fedmm",
        "options": {
            "embedding_epochs": 2,
            "rqvae_rounds": 1,
            "rqvae_epochs": 2,
            "global_codes": 16,
            "local_codes": 8,
        },
    },
    # embedding round, RQ-VAE round, CTR round; validation only after the last one (fewer messages)
    "train": {"rounds": 3, "batch_size": 4096},
    "eval": {"full_ranking": False, "candidates": 20, "every": 3},
    "progress": False,
}


def test_fedmm_on_the_deployment_engine_equals_in_process(tmp_path):
    """FedMM's three phases (local embeddings, federated RQ-VAE codebook, CTR on codes) over real SuperLink
    and SuperNode processes, every message served by a fresh ClientApp process that restores the market's
    state from its own folder: exactly the in-process numbers (same argument as the module docstring)."""
    cfg_dict = {**FEDMM_SYNTHETIC, "output_dir": str(tmp_path / "runs")}
    expected = metrics(run_experiment(config_from_dict({**cfg_dict, "name": "inproc"})))
    cfg, run_dir = prepare_flower_run(config_from_dict(cfg_dict), None, False)
    # Flower's stock ClientApp isolation (a fresh process per message); the other tests use the long-lived one
    with LocalFederation(run_dir / "flower", clientapp="per-message") as fed:
        fed.start_superlink()
        for market in cfg.dataset.markets:
            fed.start_supernode(market)
        proc = fed.submit(write_app_dir(fed.home / "app"), {"run-dir": str(run_dir)})
        wait_for_run(fed, proc, run_dir, timeout=300)
        leftovers = fed
    assert leftovers.leftover_pids() == []
    assert_same_results(metrics(run_dir), expected)
    assert (run_dir / "rounds.csv").read_text() == (Path(expected_dir(tmp_path)) / "rounds.csv").read_text()


def expected_dir(tmp_path: Path) -> Path:
    return next(p for p in (tmp_path / "runs").iterdir() if p.name.startswith("inproc"))


# ------------------------------------------------------------------------------ the SuperLink dies
def _fedmarket_cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from fedmarket.cli import main; sys.exit(main())", *args]


def test_a_killed_superlink_is_resumed_with_resume_to_the_same_numbers(tmp_path):
    """``fedmarket flower deploy`` (real SuperLink and SuperNode processes); the SuperLink is SIGKILLed as
    round 2 starts, the command fails and stops everything it started; ``--resume RUN_DIR`` starts a new
    federation, the ServerApp continues from its round-1 checkpoint and each market from its own round-1
    state, so round 2 is redone from exactly the states it started from. Tolerance: exact equality with an
    uninterrupted run (the in-process one; an uninterrupted Flower run equals it exactly, see above)."""
    cfg_dict = {
        "name": "sl_kill",
        "dataset": {
            "name": "synthetic",
            "markets": ["m0", "m1"],
            "options": {"num_markets": 2, "users_per_market": [60, 40], "items_per_market": 60},
        },
        "method": {"name": "fedprox"},
        "model": {"hidden": [16]},
        "train": {"rounds": 2, "batch_size": 256},
        "eval": {"full_ranking": False, "candidates": 20},
        "output_dir": str(tmp_path / "runs"),
        "progress": False,
    }
    expected = metrics(run_experiment(config_from_dict({**cfg_dict, "name": "inproc"})))
    config = tmp_path / "sl_kill.yaml"
    config.write_text(yaml.safe_dump(cfg_dict))
    env = {**os.environ, **FLOWER_ENV}
    first = subprocess.Popen(
        _fedmarket_cli("flower", "deploy", str(config), "--reply-timeout", "60"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        run_dir = None
        while True:
            assert time.monotonic() < deadline and first.poll() is None, first.stdout and first.stdout.read()
            runs = [p for p in (tmp_path / "runs").glob("sl_kill-*") if p.is_dir()]
            if runs and (runs[0] / "flower_progress.json").exists():
                run_dir = runs[0]
                if json.loads((run_dir / "flower_progress.json").read_text())["round"] >= 1:
                    break
            time.sleep(0.2)
        flwr_home = str(run_dir / "flower" / "flwr-home")
        superlinks = [
            pid
            for pid in processes_with_env("FLWR_HOME", flwr_home)
            if b"flower-superlink" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(superlinks) == 1, superlinks
        os.kill(superlinks[0], signal.SIGKILL)  # round 1 is checkpointed; round 2 has just started
        out, _ = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
    assert first.returncode != 0
    assert b"--resume" in out, out[-3000:]
    assert processes_with_env("FLWR_HOME", flwr_home) == []  # the failed command stopped what it started
    assert not (run_dir / "metrics.json").exists()

    resumed = subprocess.run(
        _fedmarket_cli("flower", "deploy", "--resume", str(run_dir), "--reply-timeout", "60"),
        env=env,
        capture_output=True,
        timeout=180,
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert processes_with_env("FLWR_HOME", flwr_home) == []
    assert_same_results(metrics(run_dir), expected)
    rounds = [
        r["round"] for r in json.loads((run_dir / "flower_timing.json").read_text()) if r["stage"] == "round"
    ]
    assert rounds == [2]  # the resumed ServerApp ran round 2 only


def test_supernode_authentication_refuses_an_unlisted_node_and_binds_each_market(
    tmp_path, data_dir, in_process
):
    """`--auth`: only SuperNodes whose public key was registered connect; a node with an unlisted key is
    refused by the SuperLink, and the run's numbers are those of the run without it."""
    from fedmarket.flower.launch import make_node_keys

    cfg, run_dir = prepare_flower_run(config_from_dict(xmrec_cfg(tmp_path, data_dir, "auth")), None, False)
    with LocalFederation(run_dir / "flower", tls=True, auth=True) as fed:
        fed.start_superlink()
        keys = make_node_keys(fed.home / "node-keys", ["in", "jp"])
        bound = {m: fed.register_node(keys[m][1]) for m in ("in", "jp")}
        for market in ("in", "jp"):
            fed.start_supernode(market, data_dir=str(data_dir), private_key=keys[market][0])
        unlisted = make_node_keys(tmp_path / "rogue-keys", ["rogue"])["rogue"][0]
        rogue = fed.start_supernode("in", private_key=unlisted, max_wait_time=20, name="rogue-unlisted")
        run_config = {"run-dir": str(run_dir), "market-nodes": ",".join(f"{m}:{n}" for m, n in bound.items())}
        proc = fed.submit(write_app_dir(fed.home / "app"), run_config)
        wait_for_run(fed, proc, run_dir, timeout=300)
        rogue.wait(60)
        log = fed.log_tail("rogue-unlisted", 20000)
        assert rogue.returncode != 0, log
        leftovers = fed
    assert leftovers.leftover_pids() == []
    assert not (run_dir / "flower_refused_claims.json").exists()  # the unlisted node never got in
    assert_same_results(metrics(run_dir), in_process)
