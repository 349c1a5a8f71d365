"""Checkpoints: no code runs on load, corruption is one error naming the file, the previous one is kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmarket.checkpoint import CheckpointError, load_state, previous_path, save_state


def state(value: float) -> dict:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    return {
        "round": 3,
        "w": torch.full((4,), value),
        "codes": (np.arange(5), np.ones(2)),
        "optimizer": opt.state_dict(),
        "best": {"m0": {"round": 2, "state": {"x": torch.ones(2)}}},
        "draws": {1: ["a", "b"]},
        "score": float("nan"),
    }


def test_round_trip_keeps_types_and_values(tmp_path) -> None:
    path = save_state(tmp_path / "seed0.ckpt", state(1.5))
    back = load_state(path)
    assert back["round"] == 3 and torch.equal(back["w"], torch.full((4,), 1.5))
    assert isinstance(back["codes"], tuple) and np.array_equal(back["codes"][0], np.arange(5))
    assert back["draws"] == {1: ["a", "b"]} and np.isnan(back["score"])
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))]).load_state_dict(back["optimizer"])


def test_arrays_keep_their_shape_zero_dimensional_and_strided_alike(tmp_path) -> None:
    # a 0-d array (a model's scalar parameter in a payload) must stay 0-d, or a resumed run cannot load it
    arrays = {"scalar": np.array(3.0, dtype=np.float32), "strided": np.arange(12).reshape(3, 4)[:, ::2]}
    back = load_state(save_state(tmp_path / "a.ckpt", arrays))
    for key, value in arrays.items():
        assert back[key].shape == value.shape and np.array_equal(back[key], value), key


def test_flipped_or_truncated_bytes_are_one_error_naming_the_file_and_the_previous_is_kept(tmp_path) -> None:
    path = tmp_path / "seed0.ckpt"
    save_state(path, state(1.0))
    save_state(path, state(2.0))
    assert previous_path(path).exists()
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 40, len(data) - 24):  # 16 flipped bytes inside a tensor
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"seed0\.ckpt is corrupt or truncated"):
        load_state(path)
    assert torch.equal(load_state(path, fallback=True)["w"], torch.full((4,), 1.0))  # only when asked
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_state(path)


def test_a_pickle_is_never_loaded(tmp_path) -> None:
    path = tmp_path / "seed0.ckpt"
    torch.save({"round": 1}, path)  # a pickle, as older or hostile run folders hold
    with pytest.raises(CheckpointError, match="no checksum file"):
        load_state(path)
    import hashlib

    (tmp_path / "seed0.ckpt.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match="not a fedmarket checkpoint"):
        load_state(path)


def test_a_resumed_run_refuses_a_corrupt_checkpoint_unless_asked(tmp_path, checkpointed_sim) -> None:
    sim = checkpointed_sim
    sim(2).run()
    ckpt = tmp_path / "c.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="c.ckpt"):
        sim(3).run(resume=True)
    again = sim(3)
    again.checkpoint_fallback = True
    assert again.load_checkpoint() and again.round == 1  # the previous round's checkpoint
