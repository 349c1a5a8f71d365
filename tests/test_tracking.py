"""MLflow tracking: a tiny synthetic run logged at its end, read back with MLflow's own client; failures that
must not cost the run folder; the config checks."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from fedmarket.api import run_experiment
from fedmarket.config import config_from_dict
from fedmarket.errors import ConfigError, FedmarketError
from fedmarket.lab.runs import merge_runs
from fedmarket.tracking import log_run_dir, resolve_tracking_uri

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

ROUNDS = 2


def _config(tmp_path: Path, **top) -> dict:
    return {
        "name": "tiny_tracked",
        "dataset": {
            "name": "synthetic",
            "options": {
                "num_markets": 2,
                "users_per_market": [40, 30],
                "items_per_market": 40,
                "interactions_per_user": [5, 8],
            },
        },
        "method": {"name": "fedavg"},
        "model": {"name": "deepfm", "embed_dim": 4, "hidden": [8]},
        "train": {"rounds": ROUNDS, "batch_size": 4096},
        "eval": {"full_ranking": False, "candidates": 20},
        "seeds": [0, 1],
        "output_dir": str(tmp_path / "runs"),
        "progress": False,
        **top,
    }


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> tuple[Path, Path]:
    """One tracked run for the whole module (a run and an MLflow store take a few seconds)."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    store = tmp_path / "mlruns"
    cfg = config_from_dict(_config(tmp_path, tracking="mlflow", tracking_uri=str(store)))
    return run_experiment(cfg), store


def _client(store: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=resolve_tracking_uri(str(store))[0])


def _runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_run_end_logs_parent_children_params_series_and_artifacts(tracked) -> None:
    run_dir, store = tracked
    assert (store / "mlflow.db").is_file()
    client = _client(store)
    parents, children = _runs(client, "tiny_tracked")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.run_name == run_dir.name and parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.info.run_name for c in children) == ["seed0", "seed1"]

    params = parent.data.params
    assert params["method.name"] == "fedavg" and params["train.rounds"] == str(ROUNDS)
    assert params["seeds"] == "[0, 1]" and params["tracking"] == "mlflow"

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert parent.data.metrics["test/average/auc"] == pytest.approx(metrics["average"]["auc"])
    assert parent.data.metrics["test/average/ndcg_at_10"] == pytest.approx(metrics["average"]["ndcg@10"])
    up = sum(c["up_bytes"] for c in metrics["communication"].values())
    assert parent.data.metrics["up_bytes"] == pytest.approx(up) and up > 0

    child = next(c for c in children if c.info.run_name == "seed0")
    seed = json.loads((run_dir / "seeds" / "seed0.json").read_text())
    history = client.get_metric_history(child.info.run_id, "valid/m0/auc")
    assert [p.step for p in sorted(history, key=lambda p: p.step)] == list(range(1, ROUNDS + 1))
    expected = {h["round"]: h["auc"] for h in seed["history"] if h["market"] == "m0"}
    assert {p.step: p.value for p in history} == pytest.approx(expected)
    bytes_per_round = client.get_metric_history(child.info.run_id, "up_bytes")
    assert len(bytes_per_round) == ROUNDS
    assert child.data.metrics["test/m1/auc"] == pytest.approx(seed["test"]["m1"]["auc"])

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "metrics.json", "config.yaml", "auc_per_round.png"} <= artifacts


def test_logging_a_folder_again_adds_nothing(tracked) -> None:
    run_dir, store = tracked
    client = _client(store)
    before, _ = _runs(client, "tiny_tracked")
    assert log_run_dir(run_dir, str(store)) == before[0].info.run_id
    after, children = _runs(client, "tiny_tracked")
    assert len(after) == 1 and len(children) == 2


def test_log_run_dir_into_another_experiment_by_sqlite_uri(tracked) -> None:
    run_dir, store = tracked
    uri = f"sqlite:///{store / 'mlflow.db'}"  # the same store, named as a URI (a new one takes seconds)
    run_id = log_run_dir(run_dir, uri, experiment="by-hand")
    client = MlflowClient(tracking_uri=uri)
    parents, children = _runs(client, "by-hand")
    assert [p.info.run_id for p in parents] == [run_id] and len(children) == 2
    assert (store / "artifacts").is_dir()  # artifacts next to the database


def test_tracking_failure_warns_and_keeps_the_run_folder(tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the store's folder should be")
    cfg = config_from_dict(_config(tmp_path, tracking="mlflow", tracking_uri=str(blocker / "mlruns")))
    cfg.seeds = [0]
    with caplog.at_level(logging.WARNING, logger="fedmarket.tracking"):
        run_dir = run_experiment(cfg)
    assert (run_dir / "metrics.json").is_file() and (run_dir / "report.md").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.name == "fedmarket.tracking"]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "could not log" in warnings[0]


def test_log_run_dir_names_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(FedmarketError, match=r"not a finished run folder: metrics.json is missing"):
        log_run_dir(tmp_path, str(tmp_path / "mlruns"))


def test_tracking_settings_are_checked(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"^tracking must be 'none' or 'mlflow', got 'wandb'$"):
        config_from_dict(_config(tmp_path, tracking="wandb"))
    with pytest.raises(ConfigError, match=r"^tracking_uri must be"):
        config_from_dict(_config(tmp_path, tracking="mlflow", tracking_uri=" "))
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # as if not installed: a local store needs it
    with pytest.raises(ConfigError, match=r"^tracking: mlflow needs sqlalchemy: pip install sqlalchemy$"):
        config_from_dict(_config(tmp_path, tracking="mlflow"))
    remote = config_from_dict(_config(tmp_path, tracking="mlflow", tracking_uri="http://localhost:5000"))
    assert remote.tracking_uri == "http://localhost:5000"  # a tracking server: no local store
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(
        ConfigError, match=r"needs mlflow-skinny, sqlalchemy: pip install mlflow-skinny sqlalchemy$"
    ):
        config_from_dict(_config(tmp_path, tracking="mlflow"))
    with pytest.raises(
        ConfigError, match=r"pip install mlflow-skinny \(or the extra: pip install 'fedmarket\[tracking\]'\)$"
    ):
        log_run_dir(tmp_path, "http://localhost:5000")
    assert config_from_dict(_config(tmp_path)).tracking == "none"  # off: mlflow is not needed


def test_merge_ignores_the_tracking_settings(tracked, tmp_path: Path) -> None:
    """Where a run was recorded does not change what it computed: a tracked and an untracked run of the same
    experiment merge."""
    run_dir, _ = tracked
    cfg = config_from_dict(_config(tmp_path))
    cfg.seeds = [2]
    other = run_experiment(cfg)
    merged = merge_runs([run_dir, other], tmp_path / "merged")
    assert json.loads((merged / "metrics.json").read_text())["seeds"] == [0, 1, 2]


def test_uri_resolution(tmp_path: Path) -> None:
    uri, artifacts = resolve_tracking_uri(str(tmp_path / "store"))
    assert uri == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert artifacts == (tmp_path / "store" / "artifacts").as_uri()
    assert resolve_tracking_uri(str(tmp_path / "x.db"))[0] == f"sqlite:///{tmp_path / 'x.db'}"
    assert resolve_tracking_uri("http://localhost:5000") == ("http://localhost:5000", None)


def test_epsilon_and_metric_names_from_a_folder_written_by_hand(tracked, tmp_path: Path) -> None:
    """Only the run folder's files are read: a folder from another runtime (or an older fedmarket) logs the
    same way, ε of a private run included."""
    _, store = tracked
    run_dir = tmp_path / "dp_run"
    (run_dir / "seeds").mkdir(parents=True)
    test = {"a": {"auc": 0.7, "ndcg@10": 0.2}}
    (run_dir / "metrics.json").write_text(
        json.dumps(
            {
                "name": "dp",
                "seeds": [3],
                "per_market": test,
                "average": test["a"],
                "communication": {"a": {"up_bytes": 10, "down_bytes": 20, "rounds": 1}},
                "privacy": {"epsilon": 1.5},
                "config": {"name": "dp", "privacy": {"mode": "server"}},
            }
        )
    )
    history = [{"seed": 3, "round": 1, "market": "a", "split": "valid", "auc": 0.6, "hr@5": float("nan")}]
    uploads = [{"seed": 3, "round": 1, "market": "a", "bytes": 10, "down_bytes": 20}]
    record = {"seed": 3, "test": test, "history": history, "uploads": uploads, "privacy": {"epsilon": 1.5}}
    (run_dir / "seeds" / "seed3.json").write_text(json.dumps(record))
    log_run_dir(run_dir, str(store))
    parents, children = _runs(_client(store), "dp")
    assert parents[0].data.metrics["epsilon"] == 1.5 and parents[0].data.params["privacy.mode"] == "server"
    child = children[0].data.metrics
    assert child["epsilon"] == 1.5 and child["test/a/ndcg_at_10"] == 0.2 and child["down_bytes/a"] == 20
    assert "valid/a/hr_at_5" not in child  # a value that could not be computed is not logged as a number
