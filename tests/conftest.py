import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path | None:
    # FEDMARKET_DATA, else a `shared/data` folder beside the checkout or beside one of its ancestors
    for candidate in (os.environ.get("FEDMARKET_DATA"), *(up / "shared" / "data" for up in REPO.parents)):
        if candidate and Path(candidate, "xmrec-forec").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if path is None:
        pytest.skip("real data directory not found (set FEDMARKET_DATA)")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # one cache per test session, never the user's ~/.cache
    monkeypatch.setenv("FEDMARKET_CACHE", str(tmp_path_factory.getbasetemp() / "fedmarket-cache"))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # tiny models on a shared 2-core machine: a second intra-op thread only adds contention
    # (fedmarket's own default, train.threads = 1, for the same reason)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_flower_client(monkeypatch):
    """A ClientApp message as in a fresh process: no trainer cached from an earlier test, the same Flower
    task identity every time (the in-memory grid tests of the Flower app use it)."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedmarket.flower import client as flower_client

    for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, attr, value, raising=False)
    flower_client._TRAINERS.clear()
    yield
    flower_client._TRAINERS.clear()


@pytest.fixture
def checkpointed_sim(tmp_path):
    """``make(rounds)``: a two-market FedAvg simulator over fixed deltas, checkpointing to ``tmp_path/c.ckpt``
    (the resume tests)."""
    from fedmarket.federation.payload import UploadDeclaration
    from fedmarket.federation.runtime import Simulator
    from fedmarket.federation.strategies import FedAvg
    from tests.test_privacy import FixedDelta

    def make(rounds: int) -> Simulator:
        trainers = {m: FixedDelta(m, [0.01, -0.01]) for m in "ab"}
        return Simulator(
            trainers,
            FedAvg(),
            UploadDeclaration(("w",)),
            rounds=rounds,
            checkpoint_path=tmp_path / "c.ckpt",
            progress=False,
        )

    return make
