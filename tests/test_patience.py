"""Early stopping (`train.patience`): the pure plateau bookkeeping, the in-process runtime, phased methods
(FedAvg + fine-tune ends its federated phase on the plateau, then fine-tunes until that converges), resume,
config errors and the Flower ServerApp doing exactly the same."""

from __future__ import annotations

import numpy as np
import pytest

from fedmarket.api import run_seed
from fedmarket.config import config_from_dict
from fedmarket.data import load_dataset
from fedmarket.data.mtl import split_impressions
from fedmarket.errors import ConfigError
from fedmarket.federation.runtime import Plateau


def _rows(r: int, *scores: float) -> list[dict]:
    return [{"round": r, "split": "valid", "market": f"m{i}", "auc": s} for i, s in enumerate(scores)]


def _feed(plateau: Plateau, series: list[float], strategy=None) -> list[bool]:
    history, out = [], []
    for r, score in enumerate(series, start=1):
        history += _rows(r, score, score)
        out.append(plateau.update(r, history, strategy))
    return out


def test_plateau_stops_after_patience_rounds_without_gain() -> None:
    p = Plateau(patience=2, select_metric="auc")
    assert _feed(p, [0.6, 0.7, 0.69, 0.71, 0.70, 0.705]) == [False, False, False, False, False, True]
    assert p.converged_round == 6 and p.best == pytest.approx(0.71)


def test_plateau_min_delta_counts_tiny_gains_as_none() -> None:
    p = Plateau(patience=2, min_delta=0.01, select_metric="auc")
    assert _feed(p, [0.6, 0.605, 0.609]) == [False, False, True]


def test_plateau_is_off_at_zero_and_lower_is_better_for_losses() -> None:
    assert _feed(Plateau(patience=0, select_metric="auc"), [0.5] * 10) == [False] * 10
    p = Plateau(patience=1, select_metric="logloss")
    history = []
    for r, v in enumerate([0.7, 0.6, 0.65], start=1):
        history.append({"round": r, "split": "valid", "logloss": v})
        stop = p.update(r, history, None)
    assert stop and p.best == pytest.approx(0.6)


def test_plateau_ends_a_phase_first_when_the_strategy_has_one() -> None:
    from fedmarket.federation.driver import _NoPhases

    class Phased(_NoPhases):
        def __init__(self) -> None:
            self.calls = []

        def on_plateau(self, r: int) -> bool:
            self.calls.append(r)
            return len(self.calls) == 1

    s = Phased()
    p = Plateau(patience=1, select_metric="auc")
    # phase 1 plateaus at round 3; counting restarts (a fine-tuned model may score lower than the global one)
    assert _feed(p, [0.6, 0.7, 0.7, 0.65, 0.66, 0.66], s) == [False, False, False, False, False, True]
    assert s.calls == [3, 6] and p.phase_ends == [3] and p.converged_round == 6
    q = Plateau(patience=1, select_metric="auc")
    q.load_state_dict(p.state_dict())
    assert q.state_dict() == p.state_dict()


def test_unevaluated_rounds_do_not_count() -> None:
    p = Plateau(patience=1, select_metric="auc")
    assert not p.update(1, _rows(1, 0.5), None)
    assert not p.update(2, _rows(1, 0.5), None)  # nothing for round 2
    assert p.since == 0


@pytest.mark.parametrize("bad", [{"patience": -1}, {"patience": 1.5}, {"min_delta": -0.1}, {"min_delta": 2}])
def test_bad_patience_values_are_config_errors(bad) -> None:
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=f"train.{key}"):
        config_from_dict(
            {
                "name": "t",
                "dataset": {"name": "synthetic-mtl"},
                "method": {"name": "mtl_fedavg"},
                "model": {"name": "mmoe"},
                "train": {"rounds": 3, **bad},
            }
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


def _cfg(method: str, options: dict | None = None, **train) -> object:
    return config_from_dict(
        {
            "name": "t",
            "dataset": {"name": "synthetic-mtl"},
            "method": {"name": method, "options": options or {}},
            "model": {"name": "mmoe", "embed_dim": 4, "hidden": [8], "tower_hidden": [4], "num_experts": 4},
            "train": {"batch_size": 256, **train},
            "eval": {"select_metric": "mean_auc"},
            "progress": False,
        }
    )


def test_a_run_stops_at_the_plateau(splits) -> None:
    # min_delta 0.5: no round can gain that much, so round 1 sets the best and round 2 ends the run
    result = run_seed(
        _cfg("mtl_fedavg", rounds=10, patience=1, min_delta=0.5), 0, _Prepared(splits), None, False
    )
    assert max(h["round"] for h in result.history) == 2
    assert result.convergence == {
        "patience": 1,
        "min_delta": 0.5,
        "rounds_run": 2,
        "converged_round": 2,
        "phase_ends": [],
    }
    assert run_seed(_cfg("mtl_fedavg", rounds=3), 0, _Prepared(splits), None, False).convergence == {}


def test_fedavg_finetune_fine_tunes_after_the_federated_plateau(splits) -> None:
    cfg = _cfg("mtl_fedavg_ft", {"federated_rounds": 8}, rounds=10, patience=1, min_delta=0.5)
    result = run_seed(cfg, 0, _Prepared(splits), None, False)
    assert result.convergence["phase_ends"] == [2] and result.convergence["converged_round"] == 4
    per_round = {r: [u["bytes"] for u in result.uploads if u["round"] == r] for r in (1, 2, 3, 4)}
    assert all(b > 0 for b in per_round[1] + per_round[2])  # federated
    assert all(b == 0 for b in per_round[3] + per_round[4])  # fine-tuning uploads nothing
    # the same as a fixed FedAvg + fine-tune schedule of 2 federated rounds and 2 local ones
    fixed = run_seed(
        _cfg("mtl_fedavg_ft", {"federated_rounds": 2}, rounds=4), 0, _Prepared(splits), None, False
    )
    assert fixed.test == result.test


def test_resume_after_convergence_does_not_train_more(splits, tmp_path) -> None:
    cfg = _cfg("mtl_fedavg", rounds=10, patience=1, min_delta=0.5)
    ckpt = tmp_path / "ckpt.ckpt"
    first = run_seed(cfg, 0, _Prepared(splits), ckpt, False)
    again = run_seed(cfg, 0, _Prepared(splits), ckpt, True)
    assert again.convergence == first.convergence and again.test == first.test
    assert len(again.history) == len(first.history)


def test_fecosr_pretraining_ends_at_its_plateau_and_fine_tuning_follows() -> None:
    from fedmarket.federation.strategies import FedAvgThenLocal as FederatedThenLocal

    s = FederatedThenLocal(federated_rounds=10)
    assert s.on_plateau(4) and s.federated_rounds == 4
    assert s.round_options(5) == {"upload": False, "finetune": True}
    assert not s.on_plateau(7)  # the fine-tuning converged: the run stops
    t = FederatedThenLocal(federated_rounds=10)
    t.load_state_dict(s.state_dict())
    assert t.federated_rounds == 4
    assert not FederatedThenLocal(federated_rounds=0).on_plateau(3)  # no fine-tuning stage: stop


def test_pfmsmt_finetune_variant_fine_tunes_after_its_personalised_plateau(splits) -> None:
    cfg = _cfg("pfmsmt", {"federated_rounds": 8}, rounds=10, patience=1, min_delta=0.5)
    result = run_seed(cfg, 0, _Prepared(splits), None, False)
    assert result.convergence["phase_ends"] == [2] and result.convergence["converged_round"] == 4
    per_round = {r: [u["bytes"] for u in result.uploads if u["round"] == r] for r in (1, 2, 3, 4)}
    assert all(b > 0 for b in per_round[1] + per_round[2])  # personalised federation
    assert all(b == 0 for b in per_round[3] + per_round[4])  # fine-tuning uploads nothing
    fixed = run_seed(_cfg("pfmsmt", {"federated_rounds": 2}, rounds=4), 0, _Prepared(splits), None, False)
    assert fixed.test == result.test
    # the default (0) federates every round: no phase to end, the plateau stops the run
    plain = run_seed(_cfg("pfmsmt", rounds=10, patience=1, min_delta=0.5), 0, _Prepared(splits), None, False)
    assert plain.convergence["phase_ends"] == [] and plain.convergence["converged_round"] == 2


def test_pfmsmt_finetune_rounds_send_nothing_and_resume_the_phase() -> None:
    from fedmarket.methods.pfmsmt import PersonalizedStrategy

    s = PersonalizedStrategy(federated_rounds=10, mu=0.01)
    s.initialize({"w": np.zeros(2)})
    assert s.on_plateau(3) and s.federated_rounds == 3
    assert s.configure_train(4, ["a"])["a"]  # the personalised model, once
    assert s.configure_train(5, ["a"]) == {"a": {}}
    assert s.round_options(3) == {"proximal_mu": 0.01}
    assert s.round_options(4) == {"proximal_mu": 0.0, "upload": False}
    t = PersonalizedStrategy(federated_rounds=10)
    t.load_state_dict(s.state_dict())
    assert t.federated_rounds == 3
    assert not PersonalizedStrategy().on_plateau(3)


def test_transfer_source_phase_ends_at_its_plateau_and_resumes() -> None:
    from fedmarket.methods.seq_baselines import OneToOneTransfer

    s = OneToOneTransfer("a", source_rounds=20)
    s.initialize({"w": np.zeros(2)})
    assert s.round_options(3) == {"active": ["a"], "upload": True}
    assert s.on_plateau(3) and s.source_rounds == 3  # the source converged: targets take its model next
    assert s.configure_train(4, ["a", "b"])["b"] and s.configure_train(4, ["a", "b"])["a"] == {}
    assert s.round_options(4) == {"finetune": True, "upload": False}
    assert not s.on_plateau(9)  # fine-tuning converged: stop
    t = OneToOneTransfer("a", source_rounds=20)
    t.load_state_dict(s.state_dict())
    assert t.source_rounds == 3


def test_transfer_source_phase_plateau_counts_the_source_market_only() -> None:
    from fedmarket.methods.seq_baselines import OneToOneTransfer

    s = OneToOneTransfer("m0", source_rounds=20)
    assert s.plateau_markets(3) == ["m0"] and s.on_plateau(3) and s.plateau_markets(4) is None
    t = OneToOneTransfer("m0", source_rounds=20)
    p = Plateau(patience=1, select_metric="auc")
    # the source (m0) keeps improving while the zero-shot target (m1) is flat and falls: no plateau yet
    history = []
    for r, (src, tgt) in enumerate([(0.5, 0.3), (0.6, 0.2), (0.7, 0.1)], start=1):
        history += [{"round": r, "split": "valid", "market": "m0", "auc": src}]
        history += [{"round": r, "split": "valid", "market": "m1", "auc": tgt}]
        assert not p.update(r, history, t)
    assert t.source_rounds == 20 and p.phase_ends == []


def test_a_phase_end_records_the_test_metrics_of_the_run_stopped_there(splits) -> None:
    """Phase 1 of FedAvg + fine-tune, tested where it ends, is FedAvg alone run to the same plateau (the
    "without fine-tuning" row for free), and recording it leaves the fine-tuning that follows unchanged."""
    cfg = _cfg("mtl_fedavg_ft", {"federated_rounds": 8}, rounds=10, patience=1, min_delta=0.5)
    result = run_seed(cfg, 0, _Prepared(splits), None, False)
    assert [p["round"] for p in result.phase_tests] == [2]
    alone = run_seed(
        _cfg("mtl_fedavg", rounds=10, patience=1, min_delta=0.5), 0, _Prepared(splits), None, False
    )
    assert alone.convergence["converged_round"] == 2
    assert result.phase_tests[0]["test"] == alone.test
    assert result.phase_tests[0]["selected_round"] == alone.selected_round
    assert result.test != alone.test  # the final test is the fine-tuned model's
    fixed = run_seed(
        _cfg("mtl_fedavg_ft", {"federated_rounds": 2}, rounds=4), 0, _Prepared(splits), None, False
    )
    assert fixed.test == result.test and fixed.phase_tests == []  # no plateau, no phase end recorded
    assert alone.phase_tests == []


def test_phase_tests_survive_a_resume(splits, tmp_path) -> None:
    cfg = _cfg("mtl_fedavg_ft", {"federated_rounds": 8}, rounds=10, patience=1, min_delta=0.5)
    ckpt = tmp_path / "ckpt.ckpt"
    first = run_seed(cfg, 0, _Prepared(splits), ckpt, False)
    again = run_seed(cfg, 0, _Prepared(splits), ckpt, True)
    assert again.phase_tests == first.phase_tests and len(first.phase_tests) == 1


def _TwoPhase(federated_rounds: int):  # noqa: N802 - reads as the class it builds
    """A phased strategy as the runtime sees it: first phase rounds 1..federated_rounds (`FederatedPhase`)."""
    from fedmarket.federation.driver import _NoPhases
    from fedmarket.federation.strategies import FederatedPhase

    strategy = type("TwoPhase", (FederatedPhase, _NoPhases), {})()
    strategy.federated_rounds = federated_rounds
    return strategy


def test_phase_patience_zero_runs_the_first_phase_to_its_last_round() -> None:
    s = _TwoPhase(4)
    p = Plateau(patience=1, select_metric="auc", phase_patience=0)
    # flat scores would end phase 1 at round 2 with patience 1; with phase_patience 0 it runs to round 4,
    # that round is recorded as the phase end, then patience 1 ends fine-tuning
    assert _feed(p, [0.6, 0.6, 0.6, 0.6, 0.7, 0.7], s) == [False] * 5 + [True]
    assert p.phase_ends == [4] and p.converged_round == 6 and s.federated_rounds == 4


def test_phase_patience_replaces_patience_in_the_first_phase_only() -> None:
    s = _TwoPhase(20)
    p = Plateau(patience=1, select_metric="auc", phase_patience=3)
    series = [0.6, 0.7, 0.69, 0.69, 0.69, 0.8, 0.79]
    assert _feed(p, series, s) == [False] * 6 + [True]
    assert p.phase_ends == [5] and s.federated_rounds == 5 and p.converged_round == 7
    default = Plateau(patience=1, select_metric="auc")  # phase_patience None = patience
    assert _feed(default, series[:3], _TwoPhase(20)) == [False] * 3 and default.phase_ends == [3]


def test_a_first_phase_that_reaches_its_maximum_records_its_end() -> None:
    p = Plateau(patience=2, select_metric="auc")
    assert _feed(p, [0.5, 0.6, 0.7, 0.8, 0.79, 0.78], _TwoPhase(3)) == [False] * 5 + [True]
    assert p.phase_ends == [3] and p.converged_round == 6
    assert "phase_patience" not in p.state_dict()  # configuration, not run state


def test_a_fixed_pretraining_budget_is_the_fixed_schedule_and_records_its_end(splits) -> None:
    """phase_patience 0: the federated phase runs all `federated_rounds` (matched pre-training compute), its
    end is recorded with the test of FedAvg alone at that budget, and fine-tuning then stops at its plateau."""
    opts = {"federated_rounds": 3}
    cfg = _cfg("mtl_fedavg_ft", opts, rounds=10, patience=1, min_delta=0.5, phase_patience=0)
    result = run_seed(cfg, 0, _Prepared(splits), None, False)
    assert result.convergence["phase_ends"] == [3] and result.convergence["converged_round"] == 5
    assert result.convergence["phase_patience"] == 0
    assert all(u["bytes"] > 0 for u in result.uploads if u["round"] <= 3)
    assert all(u["bytes"] == 0 for u in result.uploads if u["round"] > 3)
    fixed = run_seed(_cfg("mtl_fedavg_ft", opts, rounds=5), 0, _Prepared(splits), None, False)
    assert fixed.test == result.test
    alone = run_seed(_cfg("mtl_fedavg", rounds=3), 0, _Prepared(splits), None, False)
    assert [p["round"] for p in result.phase_tests] == [3]
    assert result.phase_tests[0]["test"] == alone.test


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_phase_patience_is_a_config_error(bad) -> None:
    with pytest.raises(ConfigError, match="train.phase_patience"):
        _cfg("mtl_fedavg_ft", {"federated_rounds": 3}, rounds=5, patience=1, phase_patience=bad)


def test_stop_slope_keeps_a_rising_noisy_curve_going_until_it_flattens() -> None:
    """The failure the guard is for: +1e-3 per round with ±2e-3 noise runs out of patience 3 early; with
    stop_slope 1e-4 over 10 rounds it stops only once the curve is flat."""
    rng = np.random.default_rng(0)
    rising = [0.3 + 1e-3 * r + rng.uniform(-2e-3, 2e-3) for r in range(60)]
    flat = [rising[-1] + rng.uniform(-2e-3, 2e-3) for _ in range(40)]

    def first_stop(plateau: Plateau) -> int | None:
        history = []
        for r, score in enumerate(rising + flat, start=1):
            history += _rows(r, score, score)
            if plateau.update(r, history, None):
                return r
        return None

    plain = Plateau(patience=3, min_delta=0.0005, select_metric="auc")
    assert first_stop(plain) < 60  # stopped while rising
    guarded = Plateau(patience=3, min_delta=0.0005, select_metric="auc", stop_slope=1e-4, slope_window=10)
    stop = first_stop(guarded)
    assert stop is not None and 60 < stop <= 100 and guarded.converged_round == stop
    window = np.asarray(guarded.scores[-10:])
    assert len(guarded.scores) == guarded.converged_round
    assert np.polyfit(window[:, 0], window[:, 1], 1)[0] <= 1e-4 == guarded.stop_slope
    assert guarded.slope() == pytest.approx(np.polyfit(window[:, 0], window[:, 1], 1)[0])


def test_stop_slope_needs_a_full_window_flips_for_losses_and_resets_per_phase() -> None:
    p = Plateau(patience=1, select_metric="auc", stop_slope=0.0, slope_window=4)
    assert _feed(p, [0.5, 0.5, 0.5, 0.5]) == [False, False, False, True]  # flat: stops at the 4th score
    assert p.slope() == 0.0  # exactly: a flat window is not "rising by 1e-17"
    q = Plateau(patience=1, select_metric="logloss", stop_slope=0.0, slope_window=3)
    history, out = [], []
    for r, v in enumerate([0.7, 0.69, 0.68, 0.66, 0.665, 0.67], start=1):
        history.append({"round": r, "split": "valid", "logloss": v})
        out.append(q.update(r, history, None))
    # round 5 runs out of patience, but the loss fell over rounds 3-5 (improving after the flip); round 6's
    # window rises
    assert out == [False] * 5 + [True]
    s = _TwoPhase(50)
    r = Plateau(patience=1, select_metric="auc", stop_slope=1e-9, slope_window=3)  # flat: polyfit's ~1e-17
    assert _feed(r, [0.6, 0.6, 0.6, 0.7, 0.7, 0.7], s) == [False] * 5 + [True]
    assert r.phase_ends == [3] and r.converged_round == 6 and len(r.scores) == 3
    t = Plateau(patience=1, select_metric="auc", stop_slope=1e-9, slope_window=3)
    t.load_state_dict(r.state_dict())
    assert t.scores == r.scores and t.state_dict() == r.state_dict()


def test_a_run_with_the_slope_guard_reports_it(splits) -> None:
    cfg = _cfg("mtl_fedavg", rounds=4, patience=1, min_delta=0.5, stop_slope=1.0, slope_window=3)
    result = run_seed(cfg, 0, _Prepared(splits), None, False)
    # min_delta 0.5: round 2 runs out of patience; the window of 3 is full at round 3, any slope <= 1.0
    assert result.convergence["converged_round"] == 3
    assert result.convergence["stop_slope"] == 1.0 and result.convergence["slope_window"] == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"patience": 1, "stop_slope": float("nan")},
        {"patience": 1, "stop_slope": "x"},
        {"patience": 0, "stop_slope": 1e-4},
        {"patience": 1, "slope_window": 1},
        {"patience": 1, "slope_window": 2.5},
    ],
)
def test_bad_slope_guard_values_are_config_errors(bad) -> None:
    key = "stop_slope" if "stop_slope" in bad else "slope_window"
    with pytest.raises(ConfigError, match=f"train.{key}"):
        _cfg("mtl_fedavg", rounds=5, **bad)
