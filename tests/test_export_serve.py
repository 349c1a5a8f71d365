"""export → recommend → serve on tiny synthetic runs: the exported model scores exactly as the trained one
at its selected round, recommendations are well-formed, and the HTTP service answers over a real socket."""

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch

from fedmarket.api import run_experiment
from fedmarket.checkpoint import load_state
from fedmarket.cli import main
from fedmarket.config import config_from_dict
from fedmarket.data.prepare import prepare_data
from fedmarket.methods import get_method
from fedmarket.methods.ctr_baselines import DENSE_UPLOAD
from fedmarket.serving.export import export_run
from fedmarket.serving.models import ExportError, read_model_file
from fedmarket.serving.recommender import Recommender, ServingInputError


def synthetic_cfg(method, out, options=None, text=False, **train):
    return config_from_dict(
        {
            "name": f"t_{method}",
            "dataset": {
                "name": "synthetic",
                "use_cache": False,
                "options": {"num_markets": 2, "users_per_market": 60, "with_text": text},
            },
            "method": {"name": method, "options": options or {}},
            "train": {"rounds": 2, "batch_size": 256, **train},
            "eval": {"full_ranking": False},
            "progress": False,
            "output_dir": str(out),
            "seeds": [0],
        }
    )


@pytest.fixture(scope="module")
def ctr(tmp_path_factory):
    """A 2-round FedAvg DeepFM run on 2 synthetic markets, exported (every market)."""
    root = tmp_path_factory.mktemp("ctr")
    cfg = synthetic_cfg("fedavg", root / "runs")
    run_dir = run_experiment(cfg)
    export_run(run_dir, root / "export")
    return cfg, run_dir, root / "export"


def trained_trainer(cfg, run_dir, market):
    """The market's trainer at its selected round, rebuilt from the round checkpoint's ``best`` state."""
    method = get_method(cfg.method.name)
    trainers, _ = method.build(cfg, method.parse_options(cfg.method.options), prepare_data(cfg).splits, 0)
    state = load_state(run_dir / "checkpoints" / "seed0.ckpt")
    trainers[market].load_state_dict(state["best"][market]["state"])
    trainers[market].model.eval()
    return trainers[market], state["best"][market]["round"]


def test_selected_models_are_written_per_market(ctr):
    cfg, run_dir, _ = ctr
    index = json.loads((run_dir / "models" / "seed0" / "index.json").read_text())
    assert set(index["markets"]) == {"m0", "m1"} and index["not_exported"] == {}
    selected = json.loads((run_dir / "metrics.json").read_text())["selected_round"]["0"]
    for market, entry in index["markets"].items():
        assert entry["selected_round"] == selected[market]
        export, meta = read_model_file(run_dir / "models" / "seed0" / entry["file"])
        assert export.family == "ctr" and meta["market"] == market
        assert not any(k.startswith(("optimizer", "state")) for k in export.weights)
        trainer, _ = trained_trainer(cfg, run_dir, market)
        for key, value in trainer.model.state_dict().items():
            assert torch.equal(export.weights[key], value), key


def test_reloaded_export_scores_equal_trained_model(ctr):
    cfg, run_dir, export = ctr
    trainer, _ = trained_trainer(cfg, run_dir, "m0")
    rec = Recommender(export / "m0")
    rng = np.random.default_rng(0)
    users = rng.integers(0, len(rec.user_ids), 50)
    items = rng.integers(0, len(rec.item_ids), 50)
    with torch.no_grad():
        expected = trainer.model(trainer.batch_x(torch.from_numpy(users), torch.from_numpy(items))).numpy()
    got = rec.score([(rec.user_ids[u], rec.item_ids[i]) for u, i in zip(users, items, strict=True)])
    assert (got["source"] == "model").all()
    np.testing.assert_array_equal(got["score"].to_numpy(np.float32), expected)
    # the ranking path (all-pairs scoring) agrees with the pairwise forward
    with torch.no_grad():
        full = trainer.model.score_matrix(trainer.data.user_x[:3], trainer.data.item_x[rec.catalog])
    np.testing.assert_allclose(rec.catalog_scores([0, 1, 2]).numpy(), full.numpy(), rtol=0, atol=1e-6)


def test_recommend_csv_ordering_history_and_fallback(ctr, tmp_path):
    _, _, export = ctr
    rec = Recommender(export / "m0")
    known = [rec.user_ids[u] for u in (0, 1, 2) if rec.indptr[u + 1] > rec.indptr[u]]
    (tmp_path / "users.csv").write_text("user\n" + "\n".join([*known, "no-such-user"]) + "\n")
    for exclude in (False, True):
        out = tmp_path / f"recs_{exclude}.csv"
        args = [
            "recommend",
            str(export / "m0"),
            "--users",
            str(tmp_path / "users.csv"),
            "--k",
            "5",
            "--out",
            str(out),
        ]
        assert main(args + (["--exclude-history"] if exclude else [])) == 0
        frame = pd.read_csv(out, dtype={"user": str, "item": str})
        assert list(frame.columns) == ["user", "rank", "item", "score", "source"]
        assert len(frame) == 5 * (len(known) + 1)
        catalog = set(rec.item_ids[rec.catalog])
        for user, group in frame.groupby("user", sort=False):
            assert group["rank"].tolist() == [1, 2, 3, 4, 5]
            assert group["score"].is_monotonic_decreasing
            assert set(group["item"]) <= catalog and group["item"].is_unique
            if user == "no-such-user":
                assert (group["source"] == "popularity").all()
                top = rec.item_ids[rec.catalog[np.argsort(-rec.popularity[rec.catalog], kind="stable")[:5]]]
                assert group["item"].tolist() == list(top)
            else:
                assert (group["source"] == "model").all()
                history = set(rec.item_ids[rec.user_history(rec.user_index[user])])
                if exclude:
                    assert not history & set(group["item"])
    with_history = pd.read_csv(tmp_path / "recs_False.csv", dtype=str)
    assert len(with_history) == len(frame)


def test_export_refuses_bad_requests_and_detects_tampering(ctr, tmp_path):
    _, run_dir, export = ctr
    with pytest.raises(ExportError, match=r"market 'zz' is not in"):
        export_run(run_dir, tmp_path / "e", ["zz"])
    with pytest.raises(ExportError, match=r"already exists; choose a new --out"):
        export_run(run_dir, export, ["m0"])
    with pytest.raises(ExportError, match=r"--seed 7"):
        export_run(run_dir, tmp_path / "e", seed=7)
    copy = tmp_path / "m0"
    shutil.copytree(export / "m0", copy)
    (copy / "items.csv").write_text((copy / "items.csv").read_text().replace("m0_i1,", "m0_iX,", 1))
    with pytest.raises(ExportError, match=r"items.csv is corrupt or changed"):
        Recommender(copy)
    with pytest.raises(ServingInputError, match=r"unknown item\(s\) \['nope'\]"):
        Recommender(export / "m0").score([("m0_u0", "nope")])
    with pytest.raises(ExportError, match=r"holds the exports of \['m0', 'm1'\]"):
        Recommender(export)
    # a run without saved models (a Flower run) is refused in one line
    flower = tmp_path / "flower_run"
    shutil.copytree(run_dir, flower, ignore=shutil.ignore_patterns("models", "checkpoints"))
    (flower / "flower").mkdir()
    with pytest.raises(ExportError, match=r"ran on Flower.*not exportable yet"):
        export_run(flower, tmp_path / "e2")
    assert not (tmp_path / "e").exists() and not (tmp_path / "e2").exists()


def test_card_lists_upload_declaration(ctr):
    cfg, _, export = ctr
    card = json.loads((export / "m0" / "card.json").read_text())
    left = card["what_left_the_market"]
    assert left["private"] is True
    # the dense layers: no statistic tables, and no cross network in a DeepFM
    in_force = get_method("fedavg").declaration_for(cfg).patterns
    assert left["upload_declaration"]["patterns"] == list(in_force) == ["dnn.*", "head.*", "bias"]
    assert set(in_force) <= set(DENSE_UPLOAD.patterns)
    assert left["communication"]["up_bytes"] > 0
    assert card["differential_privacy"]["on"] is False and card["differential_privacy"]["epsilon"] is None
    assert card["protocol_version"] == 2 and len(card["data_fingerprint"]) == 16
    assert card["metrics"]["seed"]["auc"] == pytest.approx(card["metrics"]["over_seeds"]["auc"]["mean"])
    md = (export / "m0" / "card.md").read_text()
    assert "`dnn.*`" in md and "differential privacy: off" in md


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_serve_over_real_http(ctr):
    import uvicorn

    from fedmarket.serving.app import create_app

    _, _, export = ctr
    rec = Recommender(export / "m1")
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(rec), host="127.0.0.1", port=port, log_level="warning", ws="none")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 20
        while not server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        status, health = _get(f"{base}/health")
        assert status == 200 and health["market"] == "m1" and health["catalog_items"] == rec.num_catalog
        user = rec.user_ids[0]
        status, body = _get(f"{base}/recommend?user={user}&k=4")
        assert (
            status == 200 and body["source"] == "model" and [r["rank"] for r in body["items"]] == [1, 2, 3, 4]
        )
        expected = rec.recommend([user], 4)
        assert [r["item"] for r in body["items"]] == expected["item"].tolist()
        status, body = _get(f"{base}/recommend?user=stranger&k=3")
        assert status == 200 and body["source"] == "popularity" and len(body["items"]) == 3
        status, body = _get(f"{base}/recommend?user={user}&k=0")
        assert status == 422 and "k" in body["error"]
        status, body = _get(f"{base}/recommend?k=3")
        assert status == 422 and "user" in body["error"]
        pairs = [{"user": user, "item": rec.item_ids[3]}, ["stranger", rec.item_ids[5]]]
        status, body = _post(f"{base}/score", json.dumps({"pairs": pairs}).encode())
        assert status == 200
        direct = rec.score([(user, rec.item_ids[3]), ("stranger", rec.item_ids[5])])
        assert [s["score"] for s in body["scores"]] == pytest.approx(direct["score"].tolist())
        assert [s["source"] for s in body["scores"]] == ["model", "popularity"]
        status, body = _post(f"{base}/score", json.dumps({"pairs": [[user, "nope"]]}).encode())
        assert status == 404 and "nope" in body["error"]
        status, body = _post(f"{base}/score", b"{not json")
        assert status == 422 and body["error"]
        status, body = _post(f"{base}/score", json.dumps({"pairs": [[user]]}).encode())
        assert status == 422 and "pairs[0]" in body["error"]
        status, card = _get(f"{base}/card")
        assert status == 200 and card["what_left_the_market"]["upload_declaration"]["patterns"]
    finally:
        server.should_exit = True
        thread.join(timeout=20)
    assert not thread.is_alive()


def test_sequential_export_and_recommend(tmp_path):
    """Text SASRec (hashing encoder, the fast test double) under FedAvg: the export holds the text vectors;
    its scores equal the trained model's from the user's train sequence."""
    from fedmarket.methods.seq_trainer import last_items

    options = {"text_encoder": "hashing", "hidden_dim": 16, "num_layers": 1, "max_len": 8, "num_experts": 2}
    cfg = synthetic_cfg("seq_fedavg", tmp_path / "runs", options, text=True, rounds=2)
    cfg.eval.select_metric = "ndcg@10"
    run_dir = run_experiment(cfg)
    export_run(run_dir, tmp_path / "export", ["m0"])
    rec = Recommender(tmp_path / "export" / "m0")
    assert (
        rec.family == "seq"
        and "text_vectors" in read_model_file(run_dir / "models/seed0/m0.safetensors")[0].tables
    )
    trainer, _ = trained_trainer(cfg, run_dir, "m0")
    users = [u for u in range(10) if rec.indptr[u + 1] > rec.indptr[u]][:4]
    with torch.no_grad():
        table = trainer.model.item_table()
        seqs = [rec.user_history(u) for u in users]  # local items, time order
        state = trainer.model.last_state(torch.from_numpy(last_items(seqs, 8)), table)
        expected = state @ table[torch.from_numpy(rec.catalog)].T
    np.testing.assert_allclose(rec.catalog_scores(users).numpy(), expected.numpy(), rtol=0, atol=1e-5)
    frame = rec.recommend([rec.user_ids[u] for u in users] + ["ghost"], k=3, exclude_history=True)
    assert len(frame) == 3 * 5
    assert (frame[frame["user"] == "ghost"]["source"] == "popularity").all()
    for u in users:
        got = frame[frame["user"] == rec.user_ids[u]]
        assert (got["source"] == "model").all() and not set(got["item"]) & set(
            rec.item_ids[rec.user_history(u)]
        )
    with pytest.raises(ServingInputError, match=r"single-task seq model; --task ctcvr"):
        rec.check_task("ctcvr")


def test_methods_without_export_hook_are_named(tmp_path):
    cfg = synthetic_cfg("popularity", tmp_path / "runs", rounds=1)
    run_dir = run_experiment(cfg)
    with pytest.raises(ExportError, match=r"has no exportable model \(m0: .*no export hook"):
        export_run(run_dir, tmp_path / "export")


def test_multitask_export_scores_both_tasks(tmp_path):
    """An MMoE on synthetic scenarios (every field fixed by the user or the item): the export rebuilds each
    impression from the user's and the item's fields and scores it exactly as the trainer did."""
    cfg = config_from_dict(
        {
            "name": "t_mtl",
            "dataset": {
                "name": "synthetic-mtl",
                "use_cache": False,
                "options": {"num_markets": 2, "users_per_market": 40, "items_per_market": 60},
            },
            "method": {"name": "mtl_fedavg"},
            "model": {"name": "mmoe", "embed_dim": 4, "hidden": [8], "tower_hidden": [4], "num_experts": 2},
            "train": {"rounds": 1, "batch_size": 256},
            "eval": {"select_metric": "mean_auc", "full_ranking": False},
            "progress": False,
            "output_dir": str(tmp_path / "runs"),
            "seeds": [0],
        }
    )
    run_dir = run_experiment(cfg)
    export_run(run_dir, tmp_path / "export", ["m1"])
    rec = Recommender(tmp_path / "export" / "m1")
    assert rec.family == "mtl" and rec.task == "ctr"
    trainer, _ = trained_trainer(cfg, run_dir, "m1")
    rows = trainer.data.views["m1"]["test"][:40]
    p_ctr, p_ctcvr = trainer.predict(rows)
    fields = list(trainer.data.fields)
    sparse = trainer.data.sparse.numpy()
    pairs = [(str(sparse[r, fields.index("id_user")]), str(sparse[r, fields.index("id_item")])) for r in rows]
    np.testing.assert_array_equal(rec.score(pairs)["score"].to_numpy(np.float32), p_ctr)
    rec.check_task("ctcvr")
    np.testing.assert_array_equal(rec.score(pairs)["score"].to_numpy(np.float32), p_ctcvr)
    frame = rec.recommend([pairs[0][0], "unknown"], k=5, exclude_history=True)
    assert frame.groupby("user")["rank"].apply(list).tolist() == [[1, 2, 3, 4, 5]] * 2
    with pytest.raises(ServingInputError, match=r"task must be one of \['ctr', 'ctcvr'\], got 'cvr'"):
        rec.check_task("cvr")


def test_multitask_context_features_are_not_exportable():
    from fedmarket.methods.mtl_trainer import MTLData
    from fedmarket.models.mmoe import MMoE
    from fedmarket.serving.models import NotExportable, mtl_export

    sparse = torch.tensor(
        [[0, 0, 1], [0, 1, 2], [1, 0, 1], [1, 1, 0]]
    )  # feat_ctx varies within user and item
    fields = {"id_user": 2, "id_item": 2, "feat_ctx": 3}
    views = {"s": {"valid": np.array([2]), "test": np.array([3])}}

    def data(dense_cols: int) -> MTLData:
        zeros = torch.zeros(4)
        return MTLData(sparse, torch.zeros(4, dense_cols), zeros, zeros, fields, np.array([0, 1]), views)

    with pytest.raises(NotExportable, match=r"field 'feat_ctx' varies within a user and within an item"):
        mtl_export(MMoE(fields), {}, data(0), "s")
    with pytest.raises(NotExportable, match=r"2 dense context features"):
        mtl_export(MMoE(fields, 2), {}, data(2), "s")


def test_export_from_a_comparison_picks_the_markets_winner(tmp_path, capsys):
    """`fedmarket export COMPARISON --market M` exports the private run with the best mean test metric in M
    (the report's rule), says which and against whom, and refuses without --market."""
    from fedmarket.report import load_run, write_report

    runs = [run_experiment(synthetic_cfg(m, tmp_path / "runs")) for m in ("local", "fedavg")]
    report = write_report(runs, tmp_path / "cmp")
    market = "m0"
    best = max(runs, key=lambda d: load_run(d)["per_market"][market]["auc"])
    main(["export", str(report.parent), "--market", market, "--out", str(tmp_path / "exp")])
    spec = json.loads((tmp_path / "exp" / market / "spec.json").read_text())
    assert spec["market"] == market
    card = json.loads((tmp_path / "exp" / market / "card.json").read_text())
    assert load_run(best)["name"] in json.dumps(card)
    assert main(["export", str(report.parent), "--out", str(tmp_path / "exp2")]) != 0
    assert "needs --market" in capsys.readouterr().err
    assert not (tmp_path / "exp2").exists()
