"""The long-lived ClientApp / SuperNode wrapper (`fedmarket.flower.worker`) and how `LocalFederation` starts
SuperNodes in each mode. No processes are started here; the real-process runs are in
`tests/test_flower_deployment.py` (long-lived by default, FedMM per message)."""

from __future__ import annotations

import time

import pytest

from fedmarket.errors import FedmarketError
from fedmarket.flower import worker
from fedmarket.flower.launch import LocalFederation


def test_the_supernode_poll_cap_only_shortens_that_loop_s_sleeps():
    from flwr.supernode import start_client_internal as loop

    real = loop.time
    try:
        worker.shorten_supernode_poll(0.01)
        worker.shorten_supernode_poll(0.02)  # re-applying replaces the cap, never stacks proxies
        assert loop.time._real is real and loop.time._fedmarket_poll == 0.02
        t0 = time.perf_counter()
        loop.time.sleep(3)  # Flower's idle poll
        assert time.perf_counter() - t0 < 1.0
        assert loop.time.time is real.time and time.sleep is real.sleep  # nothing else changes
    finally:
        loop.time = real


def test_local_federation_starts_supernodes_in_the_chosen_mode(tmp_path, monkeypatch):
    started = {}
    monkeypatch.setattr(LocalFederation, "start", lambda self, name, argv: started.setdefault(name, argv))
    fed = LocalFederation(tmp_path / "a")
    fed.start_supernode("de")
    argv = started["supernode-de"]
    assert argv[1:5] == ["-m", "fedmarket.flower.worker", "supernode", "--clientapp"]
    assert argv[argv.index("--isolation") + 1] == "process" and "--poll-interval" not in argv
    started.clear()
    LocalFederation(tmp_path / "b", clientapp="per-message").start_supernode("de")
    assert (
        started["supernode-de"][0].endswith("flower-supernode")
        and "--isolation" not in started["supernode-de"]
    )
    started.clear()
    LocalFederation(tmp_path / "c", clientapp="per-message", poll_interval=0.2).start_supernode("de")
    argv = started["supernode-de"]
    assert argv[argv.index("--poll-interval") + 1] == "0.2" and "--clientapp" not in argv
    with pytest.raises(FedmarketError):
        LocalFederation(tmp_path / "d", clientapp="threads")
    with pytest.raises(FedmarketError):
        LocalFederation(tmp_path / "e", poll_interval=0.0)
