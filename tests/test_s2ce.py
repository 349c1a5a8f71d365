"""S²CE (FeCoSR step 3): the soft target is a distribution with the true item as argmax; λ = 0 is CE."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedmarket.methods.s2ce import SoftTargets, fused_s2ce_loss, s2ce_loss, whiten_vectors
from fedmarket.models.text_encoder import hashing_vectors

TEXTS = [
    "Toy Story (1995). Genres: Animation, Children's, Comedy",
    "Toy Story 2 (1999). Genres: Animation, Children's, Comedy",
    "Heat (1995). Genres: Action, Crime, Thriller",
    "Heat (1995). Genres: Action, Crime, Thriller",  # identical text: must not steal the argmax
    "Casino (1995). Genres: Drama, Thriller",
    "Sabrina (1995). Genres: Comedy, Romance",
    "GoldenEye (1995). Genres: Action, Adventure, Thriller",
    "Balto (1995). Genres: Animation, Children's",
]


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return hashing_vectors(TEXTS)


@pytest.mark.parametrize(
    "tau,top_k,whiten", [(0.1, 0, False), (0.05, 0, False), (1.0, 0, False), (0.1, 3, False), (0.1, 0, True)]
)
def test_soft_target_is_a_distribution_with_the_target_as_argmax(vectors, tau, top_k, whiten):
    soft = SoftTargets.build(vectors, tau=tau, top_k=top_k, whiten=whiten)
    targets = torch.arange(len(TEXTS))
    q = soft.dense(targets)
    assert q.shape == (len(TEXTS), len(TEXTS))
    assert torch.all(q >= 0)
    torch.testing.assert_close(q.sum(1), torch.ones(len(TEXTS)))
    assert torch.equal(q.argmax(1), targets)
    # strict: no other item ties with the target, duplicates included
    top2 = q.topk(2, dim=1).values
    assert torch.all(top2[:, 0] > top2[:, 1])
    if top_k:
        assert torch.all((q > 0).sum(1) <= top_k)


def test_similar_items_get_more_mass_than_dissimilar(vectors):
    q = SoftTargets.build(vectors, tau=0.1).dense(torch.tensor([0]))[0]
    assert q[1] > q[2]  # Toy Story 2 is closer to Toy Story than Heat is


def test_lambda_zero_equals_cross_entropy_exactly(vectors):
    torch.manual_seed(0)
    logits = torch.randn(16, len(TEXTS), requires_grad=True)
    targets = torch.randint(0, len(TEXTS), (16,))
    soft = SoftTargets.build(vectors)
    loss = s2ce_loss(logits, targets, soft, lam=0.0)
    assert torch.equal(loss, F.cross_entropy(logits, targets))
    assert torch.equal(s2ce_loss(logits, targets, None, lam=0.7), F.cross_entropy(logits, targets))


@pytest.mark.parametrize("top_k", [0, 4])
@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_loss_matches_the_formula(vectors, lam, top_k):
    torch.manual_seed(1)
    logits = torch.randn(10, len(TEXTS))
    targets = torch.randint(0, len(TEXTS), (10,))
    soft = SoftTargets.build(vectors, tau=0.2, top_k=top_k)
    q = soft.dense(targets)
    logp = F.log_softmax(logits, 1)
    expected = (1 - lam) * F.cross_entropy(logits, targets) + lam * (-(q * logp).sum(1).mean())
    torch.testing.assert_close(s2ce_loss(logits, targets, soft, lam), expected)


def test_small_tau_approaches_cross_entropy(vectors):
    logits = torch.randn(6, len(TEXTS))
    targets = torch.arange(6)
    soft = SoftTargets.build(vectors, tau=1e-4)
    torch.testing.assert_close(s2ce_loss(logits, targets, soft, 1.0), F.cross_entropy(logits, targets))


def test_whitened_vectors_are_unit_norm_and_decorrelated():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) + 3.0
    w = whiten_vectors(x.astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("top_k", [0, 3])
def test_target_mass_is_the_mean_weight_on_the_true_item(vectors, top_k):
    soft = SoftTargets.build(vectors, tau=0.1, top_k=top_k)
    q = soft.dense(torch.arange(len(TEXTS)))
    assert soft.target_mass() == pytest.approx(float(q.diagonal().mean()))
    assert 1 / len(TEXTS) < soft.target_mass() < 1
    # a smaller τ keeps more mass on the target
    assert SoftTargets.build(vectors, tau=0.02, top_k=top_k).target_mass() > soft.target_mass()


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize(
    "lam,top_k,use_soft",
    [(0.5, 0, False), (0.5, 0, True), (0.5, 4, True), (1.0, 0, True), (0.3, 3, True), (0.0, 0, True)],
)
def test_fused_loss_equals_the_unfused_loss_and_its_gradients(vectors, lam, top_k, use_soft, chunk):
    torch.manual_seed(2)
    h = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    table = torch.randn(len(TEXTS), 5, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, len(TEXTS), (11,))
    soft = SoftTargets.build(vectors, tau=0.2, top_k=top_k) if use_soft else None
    if soft is not None:
        soft = SoftTargets(soft.weights.double(), soft.indices)
    ref = s2ce_loss(h @ table.T, targets, soft, lam)
    ref_h, ref_t = torch.autograd.grad(ref * 3.0, (h, table))
    fused = fused_s2ce_loss(h, table, targets, soft, lam, chunk=chunk)
    got_h, got_t = torch.autograd.grad(fused * 3.0, (h, table))  # an upstream gradient ≠ 1 is applied
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(got_h, ref_h)
    torch.testing.assert_close(got_t, ref_t)


def test_fused_loss_checks_its_inputs_and_skips_gradients_when_none_are_needed(vectors):
    h, table, targets = torch.randn(4, 3), torch.randn(len(TEXTS), 3), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="chunk"):
        fused_s2ce_loss(h, table, targets, None, chunk=0)
    with pytest.raises(ValueError, match=r"\[P, d\] and \[N, d\]"):
        fused_s2ce_loss(h, table[:, :2], targets, None)
    loss = fused_s2ce_loss(h, table, targets, None)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(h @ table.T, targets))


def test_fused_loss_of_no_positions_is_zero_with_zero_gradients():
    h = torch.zeros(0, 3, requires_grad=True)
    table = torch.randn(5, 3, requires_grad=True)
    loss = fused_s2ce_loss(h, table, torch.zeros(0, dtype=torch.long), None)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert h.grad.shape == (0, 3) and torch.equal(table.grad, torch.zeros_like(table))
