"""Protocol 2 (docs/protocol.md): the catalog rule, the planted cold-item artefact, repeated rows, and the
``evaluation`` block every run writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedmarket.data import MarketData, leave_one_out
from fedmarket.data.split import PROTOCOL_VERSION, SeenItems
from fedmarket.methods.floors import evaluate_item_scores

WARM_ITEMS, COLD_ITEMS = 1000, 400


def planted_market(name: str, seed: int, users: int = 300, cold_share: float = 0.6) -> MarketData:
    """Users buy from a pool of warm items; their held-out (validation and test) items are, for
    ``cold_share`` of users, items that nobody ever bought in train: the artefact of a leave-one-out
    benchmark whose catalog is built from every interaction."""
    rng = np.random.default_rng(seed)
    rows = []
    next_cold = WARM_ITEMS
    for u in range(users):
        history = rng.choice(WARM_ITEMS, size=8, replace=False)
        for t, item in enumerate(history[:6]):
            rows.append((u, int(item), t))
        for t, item in ((6, history[6]), (7, history[7])):
            if rng.random() < cold_share and next_cold < WARM_ITEMS + COLD_ITEMS:
                item, next_cold = next_cold, next_cold + 1
            rows.append((u, int(item), t))
    u, i, t = (np.array(c) for c in zip(*rows, strict=True))
    return MarketData(
        name,
        u,
        i,
        t,
        np.array([f"u{k}" for k in range(users)], dtype=object),
        np.array([f"i{k}" for k in range(WARM_ITEMS + COLD_ITEMS)], dtype=object),
    )


def no_history_scores(split) -> np.ndarray:
    """A scorer that knows nothing but "this item has no train interaction"."""
    warm = np.bincount(split.train_items, minlength=split.market.num_items) > 0
    return (~warm).astype(np.float64)


@pytest.mark.parametrize("market", ["m0", "m1"])
def test_a_no_history_scorer_is_exactly_chance_on_the_main_metric_and_the_cold_report_shows_it(
    market,
) -> None:
    split = leave_one_out(planted_market(market, seed=int(market[1:])))
    assert split.protocol == PROTOCOL_VERSION == 2
    scores = no_history_scores(split)
    main = evaluate_item_scores(split, scores, "test", full_ranking=True)
    # every main-metric candidate, positive or negative, has a train interaction: the scorer sees only ties
    assert split.catalog[split.test.candidates].all() and split.catalog[split.valid.candidates].all()
    assert main["auc"] == 0.5
    assert main["gauc"] == 0.5
    # the held-out positives that are cold are counted and evaluated apart, where the scorer's signal shows
    summary = split.evaluation_summary()
    assert summary["cold_test_positives"] > 0.4 * (
        summary["cold_test_positives"] + summary["evaluated_users"]
    )
    cold = evaluate_item_scores(split, scores, "cold_test", full_ranking=False)
    assert cold["auc"] > 0.7
    # under protocol 1 (catalog = every item) the same scorer would "win": the artefact this rule removes
    old = leave_one_out(planted_market(market, seed=int(market[1:])), protocol=1)
    assert evaluate_item_scores(old, scores, "test", full_ranking=False)["auc"] > 0.6


def test_full_catalog_ranking_never_ranks_an_item_outside_the_catalog() -> None:
    split = leave_one_out(planted_market("m0", seed=3))
    # cold items score highest of all; with the catalog rule they cannot push the positive down
    scores = no_history_scores(split) * 10.0 + np.linspace(0, 1, split.market.num_items)
    full = evaluate_item_scores(split, scores, "test", full_ranking=True)
    ref = evaluate_item_scores(split, np.where(split.catalog, scores, -np.inf), "test", full_ranking=True)
    assert full["full_ndcg@10"] == ref["full_ndcg@10"]


def test_repeated_rows_are_collapsed_and_never_leak_the_test_item_into_validation() -> None:
    base = planted_market("m0", seed=5, cold_share=0.0)
    doubled = MarketData(
        "m0",
        np.repeat(base.users, 2),
        np.repeat(base.items, 2),
        np.repeat(base.timestamps, 2),
        base.user_ids,
        base.item_ids,
    )
    kept = leave_one_out(doubled, repeats="keep")
    # every row duplicated: validation item == test item for every user when repeats are kept
    assert np.array_equal(kept.valid.positives, kept.test.positives)
    assert kept.evaluation_summary()["repeated_test_items"] == len(kept.test) + len(kept.cold_test)
    split = leave_one_out(doubled)
    assert split.collapsed_repeats == base.num_interactions
    assert (split.repeat_counts == 2).all()
    assert not np.any(split.valid.positives == split.test.positives)
    clean = leave_one_out(base)
    np.testing.assert_array_equal(split.test.candidates, clean.test.candidates)


def test_every_run_writes_the_evaluation_block_and_its_protocol_version(tmp_path) -> None:
    from fedmarket.api import run_experiment
    from fedmarket.config import config_from_dict

    folder = tmp_path / "markets"
    folder.mkdir()
    for k, name in enumerate(("a", "b")):
        m = planted_market(name, seed=k)
        lines = ["user,item,timestamp"] + [
            f"{m.user_ids[u]},{m.item_ids[i]},{t}"
            for u, i, t in zip(m.users, m.items, m.timestamps, strict=True)
        ]
        (folder / f"{name}.csv").write_text("\n".join(lines) + "\n")
    cfg = config_from_dict(
        {
            "name": "pop",
            "dataset": {"name": "generic", "options": {"path": str(folder)}, "use_cache": False},
            "method": {"name": "popularity"},
            "train": {"rounds": 1},
            "seeds": [0],
            "output_dir": str(tmp_path / "runs"),
            "progress": False,
        }
    )
    run_dir = run_experiment(cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["protocol_version"] == 2 and metrics["data_fingerprint"]
    report = (run_dir / "report.md").read_text()
    assert "## What was evaluated (protocol 2)" in report and "repeated rows collapsed" in report
    for market in ("a", "b"):
        ev = metrics["evaluation"][market]
        assert ev["cold_test_positives"] > 0 and ev["evaluated_users"] > 0
        assert {"cold_valid_positives", "collapsed_repeats", "catalog_items"} <= set(ev)
        # the floor places every cold item at its median score: about chance in the cold-item report
        assert abs(metrics["per_market"][market]["cold_auc"] - 0.5) < 0.05


def test_a_file_without_timestamps_is_named_in_a_warning_and_data_info_counts_repeats(
    tmp_path, caplog
) -> None:
    from fedmarket.data import dataset_info

    path = tmp_path / "shop.csv"
    path.write_text("user,item\nu1,a\nu1,b\nu1,b\nu1,c\nu2,a\nu2,c\nu2,b\n")
    with caplog.at_level("WARNING"):
        info = dataset_info("generic", path=str(path), use_cache=False)
    assert "shop.csv: no 'timestamp' column" in caplog.text
    row = info.iloc[0]
    assert row["repeated_rows"] == 1 and row["time"] == "file row"


def _write_lists(path, split, es, shuffle_seed=0) -> None:
    rng = np.random.default_rng(shuffle_seed)
    m = split.market
    rows = [
        (m.user_ids[u], m.item_ids[i], int(j == 0))
        for u, row in zip(es.users, es.candidates, strict=True)
        for j, i in enumerate(row)
    ]
    rows = [rows[k] for k in rng.permutation(len(rows))]  # a kit's file need not be grouped or ordered
    path.write_text("user\titem\tlabel\n" + "".join(f"{u}\t{i}\t{y}\n" for u, i, y in rows))


def test_given_candidate_lists_on_a_real_market_are_scored_exactly(data_dir, tmp_path) -> None:
    from dataclasses import replace

    from fedmarket.data import load_dataset
    from fedmarket.data.split import use_given_candidates
    from fedmarket.errors import DataError

    market = load_dataset("xmrec", data_dir=data_dir, markets=["in"])["in"]
    split = leave_one_out(market)
    # a kit's test file: the first 100 evaluated users, each with its positive and 99 negatives
    kit = replace(split.test, users=split.test.users[:100], candidates=split.test.candidates[:100])
    _write_lists(tmp_path / "in.test.tsv", split, kit)
    given = use_given_candidates(split, tmp_path)
    np.testing.assert_array_equal(given.test.users, kit.users)
    np.testing.assert_array_equal(np.sort(given.test.candidates[:, 1:], 1), np.sort(kit.candidates[:, 1:], 1))
    np.testing.assert_array_equal(given.test.positives, kit.positives)
    assert given.evaluation_summary()["given_candidates"] is True
    scores = np.random.default_rng(0).random(market.num_items)
    a = evaluate_item_scores(given, scores, "test", full_ranking=False)
    b = evaluate_item_scores(replace(split, test=kit), scores, "test", full_ranking=False)
    assert a["auc"] == pytest.approx(b["auc"]) and a["ndcg@10"] == pytest.approx(b["ndcg@10"])
    # a list whose positive is not the user's held-out item: one line naming file, line and user
    text = (tmp_path / "in.test.tsv").read_text().splitlines()
    k = next(j for j, line in enumerate(text) if line.endswith("\t1"))
    u, _, _ = text[k].split("\t")
    other = market.item_ids[kit.candidates[0, 1]]
    text[k] = f"{u}\t{other}\t1"
    (tmp_path / "in.test.tsv").write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"in\.test\.tsv.*(positive|positives)"):
        use_given_candidates(split, tmp_path)


def test_large_markets_draw_negatives_by_rejection_with_the_same_rules(monkeypatch) -> None:
    import fedmarket.data.split as split_module

    monkeypatch.setattr(split_module, "DENSE_LIMIT", 0)  # every market counts as large
    split = leave_one_out(planted_market("m0", seed=4))
    for es in (split.valid, split.test):
        negs = es.candidates[:, 1:]
        assert (np.sort(negs, 1)[:, 1:] != np.sort(negs, 1)[:, :-1]).all()  # distinct in each list
        assert split.catalog[negs].all()  # from the catalog only
        seen = SeenItems.build(
            split.market.users, split.market.items, split.market.num_users, split.market.num_items
        )
        assert not seen.contains(np.repeat(es.users, negs.shape[1]), negs.ravel()).any()
