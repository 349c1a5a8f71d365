"""The README's path from a fresh clone to a served recommendation, end to end on synthetic markets: `fedmarket
demo` (its six rows; every run recorded in MLflow), `fedmarket export COMPARISON --market M` (the market's
winner), `fedmarket serve` (a real HTTP server) and a GET of `/recommend` as `curl` would send it."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from fedmarket.cli import DEMO_CONFIGS, main

pytest.importorskip("mlflow")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]


def test_demo_export_serve_recommend(tmp_path, monkeypatch, capsys) -> None:
    import uvicorn
    from mlflow.tracking import MlflowClient

    from fedmarket.serving.app import create_app
    from fedmarket.serving.recommender import Recommender
    from fedmarket.tracking import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)  # the demo's default MLflow store ./mlruns lands here
    rc = main(
        [
            "demo",
            "--config-dir", str(ROOT / "configs"),
            "--out", "cmp",
            "--output-dir", "runs",
            "--no-progress",
            "--set", "dataset.name=synthetic",
            "--set", "dataset.options={num_markets: 2, users_per_market: 60}",
            "--set", "train.rounds=8",
            "--set", "eval.full_ranking=false",
        ]
    )  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "recorded in the MLflow store" in out and "fedmarket export" in out

    # every run of the demo is in the MLflow store: one parent run per row, a child per seed
    client = MlflowClient(tracking_uri=resolve_tracking_uri("mlruns")[0])
    parents = [
        r
        for exp in client.search_experiments()
        for r in client.search_runs([exp.experiment_id])
        if "mlflow.parentRunId" not in r.data.tags
    ]
    assert len(parents) == len(DEMO_CONFIGS)

    # the winner of market m0, exported from the comparison
    assert main(["export", "cmp", "--market", "m0", "--out", "exports"]) == 0
    assert "has the best test auc" in capsys.readouterr().out
    rec = Recommender(Path("exports") / "m0")

    # served over HTTP, asked as `curl 'localhost:PORT/recommend?user=U&k=5'` would
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(rec), host="127.0.0.1", port=port, log_level="warning", ws="none")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 20
        while not server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        user = rec.user_ids[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/recommend?user={user}&k=5", timeout=10) as r:
            body = json.loads(r.read())
        assert body["source"] == "model" and len(body["items"]) == 5
    finally:
        server.should_exit = True
        thread.join(timeout=20)
