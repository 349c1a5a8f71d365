"""The comparison summaries: shared helpers (fedmarket.lab.summary) and scripts/compare_fecosr.py on hand-built
merged run folders whose numbers are known."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedmarket.lab.summary import paired, per_seed_average, rounds_text, upload_bytes

ROOT = Path(__file__).resolve().parents[1]
MARKETS = ["a", "b", "c"]


def _merged_run(
    root: Path,
    name: str,
    method: str,
    per_seed: dict[int, dict[str, float]],
    up: dict[str, int] | None = None,
    private: bool = True,
    conv: dict | None = None,
    down: dict[str, int] | None = None,
) -> Path:
    """A merged run folder: seeds/seed<N>.json with test full_ndcg@10 and ndcg@10 per market, metrics.json with
    the mean over seeds."""
    run_dir = root / name
    (run_dir / "seeds").mkdir(parents=True)
    for seed, values in per_seed.items():
        test = {
            m: {"full_ndcg@10": v, "ndcg@10": 2 * v, "full_hr@10": v, "hr@10": 2 * v}
            for m, v in values.items()
        }
        (run_dir / "seeds" / f"seed{seed}.json").write_text(json.dumps({"seed": seed, "test": test}))
    per_market = {
        m: {
            k: float(np.mean([f * per_seed[s][m] for s in per_seed]))
            for k, f in (("full_ndcg@10", 1), ("ndcg@10", 2), ("full_hr@10", 1), ("hr@10", 2))
        }
        for m in MARKETS
    }
    average = {k: float(np.mean([per_market[m][k] for m in MARKETS])) for k in per_market["a"]}
    up, down = up or {}, down or {}
    metrics = {
        "name": name,
        "label": name,
        "method": method,
        "private": private,
        "seeds": sorted(per_seed),
        "markets": MARKETS,
        "per_market": per_market,
        "average": average,
        "average_std": {k: 0.0 for k in average},
        "communication": {
            m: {"up_bytes": up.get(m, 0), "down_bytes": down.get(m, 0), "rounds": 10} for m in MARKETS
        },
        "convergence": conv or {},
        "config": {"train": {"rounds": 10}},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


def test_per_seed_average_and_paired(tmp_path: Path) -> None:
    a = _merged_run(
        tmp_path, "x", "m", {0: {"a": 0.1, "b": 0.2, "c": 0.3}, 1: {"a": 0.4, "b": 0.5, "c": 0.6}}
    )
    assert per_seed_average(a, "full_ndcg@10") == pytest.approx({0: 0.2, 1: 0.5})
    assert per_seed_average(a, "ndcg@10") == pytest.approx({0: 0.4, 1: 1.0})
    # two paired seeds: no interval, so no verdict
    assert paired({0: 0.3, 1: 0.2, 2: 9.0}, {0: 0.2, 1: 0.5}) == "-0.1000 (2 seeds: untested)"
    assert paired({0: 0.3}, {0: 0.25}, scale=100, digits=2) == "+5.00 (1 seed: untested)"
    # three: differences +0.1, +0.2, +0.3: mean +0.2, t(2) 95 % half-width 4.303 * 0.1 / sqrt(3) = 0.2484
    assert paired({0: 0.3, 1: 0.4, 2: 0.5}, {0: 0.2, 1: 0.2, 2: 0.2}) == "+0.2000 [-0.0484, +0.4484] tie"
    assert paired({0: 0.3, 1: 0.31, 2: 0.32}, {0: 0.2, 1: 0.2, 2: 0.2}).endswith("wins")
    assert paired({0: 0.3}, {1: 0.25}) == "no common seeds"


def test_rounds_text_and_upload() -> None:
    metrics = {
        "convergence": {
            "0": {"rounds_run": 30, "converged_round": 30, "phase_ends": [12]},
            "1": {"rounds_run": 40, "converged_round": None, "phase_ends": [18]},
        },
        "communication": {"a": {"up_bytes": 100, "rounds": 10}, "b": {"up_bytes": 0, "rounds": 10}},
    }
    assert rounds_text(metrics) == "35 (30–40), phase 1 ended at 15, 1 capped"
    assert rounds_text({"convergence": {}, "config": {"train": {"rounds": 7}}}) == "7"
    assert upload_bytes(metrics) == 50.0
    assert upload_bytes(metrics, per_round=True) == 5.0


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_compare_fecosr_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    merged = tmp_path / "merged"
    ds = "movielens-age"
    seeds = (0, 1)
    _merged_run(
        merged, f"{ds}_seq_local_text", "seq_local_text", {s: {"a": 0.1, "b": 0.1, "c": 0.1} for s in seeds}
    )
    _merged_run(
        merged,
        f"{ds}_seq_central_shared_ids",
        "seq_central",
        {s: {"a": 0.3, "b": 0.3, "c": 0.3} for s in seeds},
        private=False,
    )
    # FeCoSR closes half the gap in seed 0 (0.2) and a quarter in seed 1 (0.15): 38 % on average
    _merged_run(
        merged,
        f"{ds}_fecosr",
        "fecosr",
        {0: {"a": 0.2, "b": 0.2, "c": 0.2}, 1: {"a": 0.15, "b": 0.15, "c": 0.15}},
        up={m: 2_000_000 for m in MARKETS},
        conv={"0": {"rounds_run": 20, "converged_round": 20, "phase_ends": [10]}},
    )
    _merged_run(
        merged, f"{ds}_seq_fedavg_ft", "seq_fedavg_ft", {s: {"a": 0.16, "b": 0.16, "c": 0.16} for s in seeds}
    )
    # transfer from `a` (the only uploader): source +0.05, targets b below local (negative), c above
    _merged_run(
        merged,
        f"{ds}_seq_transfer",
        "seq_transfer",
        {s: {"a": 0.15, "b": 0.08, "c": 0.12} for s in seeds},
        up={"a": 1_000_000},  # 4 uploads of 0.25 MB, each target downloads the model once
        down={"b": 250_000, "c": 250_000},
    )
    # a second transfer row (source phase 150 rounds) with no local row of its own variant: compared with the
    # plain Local text row; its own line, c below local
    _merged_run(
        merged,
        f"{ds}_seq_transfer_fixed-pt",
        "seq_transfer",
        {s: {"a": 0.15, "b": 0.12, "c": 0.05} for s in seeds},
        up={"a": 250_000},
        down={"b": 250_000, "c": 250_000},
    )
    # validation curves for the matched-round table: S²CE behind CE by 0.002 in rounds 1-3 of seed 0
    for name, level in (("fecosr", 0.298), ("seq_fedavg_ft", 0.3)):
        path = merged / f"{ds}_{name}" / "seeds" / "seed0.json"
        rec = json.loads(path.read_text())
        rec["history"] = [
            {"round": r, "market": m, "split": "valid", "ndcg@10": level + 0.01 * r}
            for r in (1, 2, 3)
            for m in MARKETS
        ]
        path.write_text(json.dumps(rec))
    mod = _load_script("compare_fecosr")
    out = tmp_path / "out"
    monkeypatch.setattr(
        sys, "argv", ["compare_fecosr", str(merged), "--out", str(out), "--datasets", ds, "xmrec"]
    )
    mod.main()
    text = (out / "summary.md").read_text()
    assert "| ≤ 40 rounds | 0 | 1–3 | 0 of 3 | -2.0 | -2.0 |" in text
    assert (out / f"fecosr_matched_{ds}.png").stat().st_size > 1000
    assert "## movielens-age" in text and "## xmrec" not in text
    assert "| **FeCoSR** (S²CE + fine-tune) | 2 | 20, phase 1 ended at 10 | 17.50 ± 0.00 |" in text
    assert "| 2.00 |" in text  # FeCoSR's upload, MB per market
    assert "raw data" in text  # Central
    # FeCoSR − FedAvg-CE + FT: +0.04 and -0.01 -> +1.50 over 2 seeds: no interval, no verdict
    assert (
        "| FeCoSR − FedAvg-CE + fine-tune (S²CE vs CE, with fine-tune) | +1.50 (2 seeds: untested) |" in text
    )
    assert "FeCoSR closes 38 % of the Local text → Central gap (seeds: 2)" in text
    assert "source `a` +5.00; negative transfer in 1 of 2 targets (`b` -2.00)" in text
    assert (
        "- `seq_transfer_fixed-pt` vs `seq_local_text` (full_ndcg@10, ×100, mean over seeds): source `a` +5.00; negative transfer in 1 of 2 targets (`c` -5.00)."
        in text
    )
    assert "uploaded its model 4 times (1.00 MB)" in text
    assert "once: 0.25 MB from the source, 0.08 MB per market on average" in text
    assert (out / f"fecosr_{ds}.png").stat().st_size > 1000
    assert (out / ds / "report.md").is_file()


def test_compare_fecosr_transfer_reference_prefers_the_same_variant() -> None:
    mod = _load_script("compare_fecosr")
    by = dict.fromkeys(["seq_local_id", "seq_local_id_p10", "seq_local_text"])
    assert mod.transfer_reference("seq_transfer_id_p10", "seq_transfer_id", by) == "seq_local_id_p10"
    assert mod.transfer_reference("seq_transfer_id", "seq_transfer_id", by) == "seq_local_id"
    assert mod.transfer_reference("seq_transfer_fixed-pt", "seq_transfer", by) == "seq_local_text"
    assert mod.transfer_reference("seq_transfer", "seq_transfer", {}) is None


def test_compare_fecosr_names_missing_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = _load_script("compare_fecosr")
    monkeypatch.setattr(sys, "argv", ["compare_fecosr", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="nope"):
        mod.main()
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(
        sys, "argv", ["compare_fecosr", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    )
    with pytest.raises(SystemExit, match="no run folder"):
        mod.main()


def test_compare_fecosr_headline_puts_the_splits_side_by_side(tmp_path: Path) -> None:
    """headline.md: the current protocol's rows with both splits as columns (seeds in brackets, "–" where a split
    lacks a row), upload per split, and the comparison's questions as paired differences per split."""
    mod = _load_script("compare_fecosr")
    merged = tmp_path / "merged"
    age, zip_ = "movielens-age", "movielens-zip"
    seeds3 = (0, 1, 2)
    # age: transfer 0.10 in every seed; FeCoSR 0.11 / 0.12 / 0.09 -> +1.00, +2.00, -1.00: +0.67 ± 1.53, 2 of 3
    _merged_run(
        merged,
        f"{age}_seq_transfer_fixed-pt",
        "seq_transfer",
        {s: dict.fromkeys(MARKETS, 0.10) for s in seeds3},
        up={"a": 3_000_000},
    )
    fecosr = {0: 0.11, 1: 0.12, 2: 0.09}
    _merged_run(
        merged,
        f"{age}_fecosr_m05_fixed-pt",
        "fecosr",
        {s: dict.fromkeys(MARKETS, v) for s, v in fecosr.items()},
        up=dict.fromkeys(MARKETS, 2_000_000),
    )
    # zip: one seed of each, transfer uploads 6 MB from one of 3 markets
    _merged_run(
        merged,
        f"{zip_}_seq_transfer_fixed-pt",
        "seq_transfer",
        {0: dict.fromkeys(MARKETS, 0.20)},
        up={"b": 6_000_000},
    )
    _merged_run(
        merged,
        f"{zip_}_fecosr_m05_fixed-pt",
        "fecosr",
        {0: dict.fromkeys(MARKETS, 0.15)},
        up=dict.fromkeys(MARKETS, 2_000_000),
    )
    _merged_run(
        merged,
        f"{zip_}_seq_central_shared_ids",
        "seq_central",
        {0: dict.fromkeys(MARKETS, 0.3)},
        private=False,
    )
    # zip: Local text under both stopping rules; the unqualified label and the check go to convergence (p10)
    _merged_run(merged, f"{zip_}_seq_local_text_p10", "seq_local_text", {0: dict.fromkeys(MARKETS, 0.05)})
    _merged_run(merged, f"{zip_}_seq_local_text", "seq_local_text", {0: dict.fromkeys(MARKETS, 0.04)})
    text = "\n".join(mod.headline([merged], [age, zip_, "movielens-none"]))
    assert "| Local text-SASRec | – | – | 5.00 (1) | 10.00 (1) | 0.00 |" in text
    assert "| Local text-SASRec, patience-3 stop | – | – | 4.00 (1) | 8.00 (1) | 0.00 |" in text
    assert "| FeCoSR − Local text-SASRec | – | +10.00 (1 seed: untested) |" in text
    assert "| FeCoSR − Local text-SASRec, patience-3 stop | – | +11.00 (1 seed: untested) |" in text
    assert (
        "| row | movielens-age full NDCG@10 | movielens-age NDCG@10 (1+99) | movielens-zip full NDCG@10 |"
        in text
    )
    assert "movielens-none" not in text  # a split without any headline row gets no column
    assert (
        "| One-to-one transfer + fine-tune | 10.00 ± 0.00 (3) | 20.00 ± 0.00 (3) | 20.00 (1) | 40.00 (1) | 1.00 / 2.00 |"
        in text
    )
    assert (
        "| **FeCoSR** (S²CE + fine-tune) | 10.67 ± 0.00 (3) | 21.33 ± 0.00 (3) | 15.00 (1) | 30.00 (1) | 2.00 |"
        in text
    )
    assert "| Central-shared-IDs †, patience-3 stop | – | – | 30.00 (1) | 60.00 (1) | raw data |" in text
    assert "Local ID-SASRec" not in text  # in no split
    assert "| FeCoSR − one-to-one transfer | +0.67 [-3.13, +4.46] tie | -5.00 (1 seed: untested) |" in text
    assert "S²CE − CE" not in text  # no CE twin anywhere
    assert mod.headline([merged], ["movielens-none"]) == []


def test_compare_fecosr_derives_the_first_phase_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A phased run that recorded its phase end gives the "without fine-tune" row with no run of its own; a
    folder that did not (hand-built here, or run before phase tests were recorded) is skipped and said so."""
    from fedmarket.api import run_experiment
    from fedmarket.config import config_from_dict

    ds = "movielens-age"
    cfg = config_from_dict(
        {
            "name": f"{ds}_fecosr_long-pt",  # a small MTL FedAvg + fine-tune stands in for the phased row
            "dataset": {
                "name": "synthetic-mtl",
                "options": {"num_markets": 2, "users_per_market": 30, "items_per_market": 40},
                "use_cache": False,
            },
            "method": {"name": "mtl_fedavg_ft", "options": {"federated_rounds": 8}},
            "model": {"name": "mmoe", "embed_dim": 4, "hidden": [8], "tower_hidden": [4], "num_experts": 4},
            "train": {"batch_size": 256, "rounds": 10, "patience": 1, "min_delta": 0.5},
            "eval": {"select_metric": "mean_auc"},
            "output_dir": str(tmp_path / "runs"),
            "progress": False,
            "seeds": [0],
        }
    )
    merged = tmp_path / "merged"
    merged.mkdir()
    run_experiment(cfg).rename(merged / f"{ds}_fecosr_long-pt")
    # the fixed pre-training budget (train.phase_patience 0): its first phase ends at its last round
    fixed = config_from_dict(
        {
            **cfg.to_dict(),
            "name": f"{ds}_fecosr_fixed-pt",
            "method": {"name": "mtl_fedavg_ft", "options": {"federated_rounds": 3}},
            "train": {**cfg.to_dict()["train"], "phase_patience": 0},
        }
    )
    run_experiment(fixed).rename(merged / f"{ds}_fecosr_fixed-pt")
    _merged_run(merged, f"{ds}_seq_fedavg_ft_long-pt", "seq_fedavg_ft", {0: {"a": 0.1, "b": 0.1, "c": 0.1}})
    mod = _load_script("compare_fecosr")
    out = tmp_path / "out"
    log = mod.derive_first_phases([merged], [ds], out)
    assert log[0] == f"{ds}_fecosr_long-pt: first phase derived"
    assert (
        log[1].startswith(f"{ds}_seq_fedavg_ft_long-pt: no first phase")
        and "config.yaml is missing" in log[1]
    )
    first = json.loads((out / "phase1" / f"{ds}_fecosr_long-pt_phase1" / "metrics.json").read_text())
    seed0 = json.loads((merged / f"{ds}_fecosr_long-pt" / "seeds" / "seed0.json").read_text())
    assert first["per_market"] == seed0["phase_tests"][0]["test"]
    assert rounds_text(first) == "2"
    assert not (out / "phase1" / f"{ds}_seq_fedavg_ft_long-pt_phase1").exists()
    assert f"{ds}_fecosr_fixed-pt: first phase derived" in log
    fixed_first = json.loads((out / "phase1" / f"{ds}_fecosr_fixed-pt_phase1" / "metrics.json").read_text())
    assert rounds_text(fixed_first) == "3"


def test_stop_slopes_tell_a_plateau_from_a_stop_on_noise(tmp_path: Path) -> None:
    """Phase 1 stops at round 30 while its score still rises 0.002 per round; phase 2 stops flat at 45."""
    from fedmarket.eval.convergence import stop_slopes

    rng = np.random.default_rng(0)
    history = []
    for r in range(1, 46):
        level = 0.3 + 0.002 * r if r <= 30 else 0.5
        for m, noise in zip(("a", "b"), rng.normal(0, 0.0005, 2), strict=True):
            history.append({"round": r, "market": m, "split": "valid", "ndcg@10": level + noise})
        history.append({"round": r, "market": "a", "split": "test", "ndcg@10": 9.0})  # not validation
    run = tmp_path / "run"
    (run / "seeds").mkdir(parents=True)
    conv = {"patience": 3, "min_delta": 0.0005, "rounds_run": 45, "converged_round": 45, "phase_ends": [30]}
    (run / "seeds" / "seed0.json").write_text(
        json.dumps({"seed": 0, "test": {}, "history": history, "convergence": conv})
    )
    (run / "seeds" / "seed1.json").write_text(json.dumps({"seed": 1, "test": {}, "history": history}))
    rows = stop_slopes(run, "ndcg@10", window=20)
    assert [(r["seed"], r["round"], r["kind"], r["rounds_fitted"]) for r in rows] == [
        (0, 30, "phase end", 15),  # window 20, at most the second half of the phase
        (0, 45, "converged", 7),  # inside its phase: the second half of a 15-round phase
    ]
    assert rows[0]["slope"] == pytest.approx(0.002, abs=1e-4)
    assert abs(rows[1]["slope"]) < 1e-4
    assert rows[0]["score"] == pytest.approx(0.36, abs=1e-3)


def test_matched_rounds_compares_first_phases_round_by_round(tmp_path: Path) -> None:
    from fedmarket.lab.summary import matched_rounds

    def write(name: str, seed: int, level, phase_end: int | None, rounds: int) -> Path:
        run = tmp_path / name
        (run / "seeds").mkdir(parents=True, exist_ok=True)
        history = [
            {"round": r, "market": m, "split": split, "ndcg@10": level(r) + (5.0 if split == "test" else 0.0)}
            for r in range(1, rounds + 1)
            for m in ("a", "b")
            for split in ("valid", "test")
        ]
        conv = {"phase_ends": [phase_end]} if phase_end else {}
        (run / "seeds" / f"seed{seed}.json").write_text(
            json.dumps({"seed": seed, "history": history, "convergence": conv})
        )
        return run

    # a: ahead by 0.01 until round 5, behind by 0.02 after; its phase ends at 8 (fine-tuning after it jumps);
    # b: phase ends at 12. Seed 1 only in a: left out.
    a = write("a", 0, lambda r: 0.3 + 0.01 * r + (0.01 if r <= 5 else -0.02) + (1.0 if r > 8 else 0), 8, 20)
    b = write("b", 0, lambda r: 0.3 + 0.01 * r, 12, 15)
    write("a", 1, lambda r: 0.0, None, 3)
    (row,) = matched_rounds(a, b, "ndcg@10")
    assert (row["seed"], row["rounds"], row["last_round"], row["a_ahead"]) == (0, 8, 8, 5)
    assert row["mean_diff"] == pytest.approx((5 * 0.01 - 3 * 0.02) / 8)
    assert row["last_diff"] == pytest.approx(-0.02)
    # a run made before a first phase's maximum counted as its end: its config's federated_rounds caps it
    (b / "config.yaml").write_text(yaml.safe_dump({"method": {"options": {"federated_rounds": 6}}}))
    (row,) = matched_rounds(a, b, "ndcg@10")
    assert (row["rounds"], row["last_round"], row["a_ahead"]) == (6, 6, 5)
    assert row["mean_diff"] == pytest.approx((5 * 0.01 - 0.02) / 6)


def test_compare_s2ce_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def run(name: str, level: float, options: dict, rounds: int, phase_end: int | None = None) -> Path:
        folder = tmp_path / "sweep" / name if name.startswith("s2ce") else tmp_path / name
        (folder / "seeds").mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({"method": {"options": options}}))
        history = [
            {"round": r, "market": m, "split": "valid", "ndcg@10": level + 0.01 * r}
            for r in range(1, rounds + 1)
            for m in MARKETS
        ]
        conv = {"phase_ends": [phase_end]} if phase_end else {}
        (folder / "seeds" / "seed0.json").write_text(
            json.dumps({"seed": 0, "history": history, "convergence": conv})
        )
        return folder

    ce = run("ce", 0.30, {"loss": "ce", "federated_rounds": 100}, 10)
    default = run("default", 0.29, {"tau": 0.1, "top_k": 50, "lam": 0.5, "federated_rounds": 100}, 10)
    run("s2ce_sweep_lam0.25", 0.303, {"tau": 0.1, "top_k": 50, "lam": 0.25, "federated_rounds": 0}, 4)
    mod = _load_script("compare_s2ce_sweep")
    out = tmp_path / "out" / "summary.md"
    argv = ["x", str(tmp_path / "sweep"), "--ce", str(ce), "--default", str(default), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    text = out.read_text()
    assert "| default | tau 0.1, top_k 50, lam 0.5 | 0 | 1–10 | 0 of 10 | -10.0 | -10.0 | – | – |" in text
    assert (
        "| s2ce_sweep_lam0.25 | tau 0.1, top_k 50, lam 0.25 | 0 | 1–4 | 4 of 4 | +3.0 | +3.0 | 4 of 4 | +13.0 |"
        in text
    )
    assert out.with_suffix(".png").stat().st_size > 1000
    monkeypatch.setattr(sys, "argv", [*argv, "--max-round", "3"])
    mod.main()
    assert (
        "| default | tau 0.1, top_k 50, lam 0.5 | 0 | 1–3 | 0 of 3 | -10.0 | -10.0 | – | – |"
        in out.read_text()
    )
    monkeypatch.setattr(sys, "argv", ["x", str(tmp_path / "nope"), "--ce", str(ce), "--out", str(out)])
    with pytest.raises(SystemExit, match="nope"):
        mod.main()


def test_s2ce_target_mass_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Per setting of a jobs file: the soft target's mass on the true item, from the framework's own data."""
    from fedmarket.config import load_config
    from fedmarket.data.prepare import prepare_data
    from fedmarket.methods.s2ce import SoftTargets
    from fedmarket.methods.seq_trainer import market_text_vectors

    config = tmp_path / "fecosr.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "t_fecosr",
                "dataset": {
                    "name": "synthetic",
                    "options": {
                        "num_markets": 2,
                        "users_per_market": 20,
                        "items_per_market": 30,
                        "with_text": True,
                    },
                    "use_cache": False,
                },
                "method": {"name": "fecosr", "options": {"text_encoder": "hashing", "tau": 0.1, "top_k": 10}},
                "model": {"name": "sasrec"},
                "eval": {"candidates": 5},
            }
        )
    )
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(
        yaml.safe_dump(
            [
                {"config": str(config), "set": {"name": "soft"}},
                {
                    "config": str(config),
                    "set": {"name": "sharp", "method.options.tau": 0.01, "method.options.lam": 0.25},
                },
            ]
        )
    )
    mod = _load_script("s2ce_target_mass")
    monkeypatch.setattr(sys, "argv", ["x", "--jobs-file", str(jobs)])
    mod.main()
    table = capsys.readouterr().out.splitlines()
    soft, sharp = (line.split(" | ") for line in table[2:4])
    assert soft[0] == "| soft" and sharp[0] == "| sharp"
    cfg = load_config(config)
    vectors = [market_text_vectors(s, "hashing") for s in prepare_data(cfg).splits.values()]
    expected = np.mean([SoftTargets.build(v, 0.1, 10).target_mass() for v in vectors])
    assert float(soft[2]) == pytest.approx(expected, abs=1e-3)
    assert float(soft[3]) == pytest.approx(0.5 + 0.5 * expected, abs=1e-3)
    assert float(sharp[2]) > float(soft[2])  # a smaller τ keeps more on the target
    monkeypatch.setattr(sys, "argv", ["x", "--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(SystemExit, match="missing.yaml"):
        mod.main()
