"""MMoE with BatchNorm experts, per-task gates, ESMM/direct towers, expert groups."""

from __future__ import annotations

import pytest
import torch

from fedmarket.models.mmoe import MMoE

FIELDS = {"id_user": 10, "id_item": 20, "feat_genre": 5}


def _batch(n: int = 64, dense: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sparse = torch.stack([torch.randint(0, v, (n,), generator=g) for v in FIELDS.values()], dim=1)
    return sparse, torch.randn(n, dense, generator=g)


def test_expert_groups_and_names() -> None:
    model = MMoE(FIELDS, num_dense=3, num_shared_experts=2, num_task_experts=1, num_scenario_experts=1)
    names = set(model.state_dict())
    assert "experts_shared.1.linear0.weight" in names
    assert "experts_shared.0.bn0.running_mean" in names  # BatchNorm experts
    assert {"experts_task.ctr.0.linear0.weight", "experts_task.cvr.0.linear0.weight"} <= names
    assert "experts_scenario.0.linear1.weight" in names
    assert {"gates.ctr.weight", "gates.cvr.weight", "towers.ctr.out.weight", "towers.cvr.out.weight"} <= names
    # each task's gate mixes shared + its own task experts + scenario experts
    assert model.gates["ctr"].out_features == 4
    # embeddings start small (DATA.md: N(0, 1) left models undertrained)
    assert model.embedding["id_item"].weight.std() < 0.05


def test_esmm_product_and_direct_mode() -> None:
    sparse, dense = _batch()
    esmm = MMoE(FIELDS, num_dense=3).eval()
    p_ctr, p_ctcvr = esmm.predict(sparse, dense)
    assert p_ctr.shape == p_ctcvr.shape == (64,)
    assert (p_ctcvr <= p_ctr + 1e-7).all()  # p_CTCVR = p_CTR · p_CVR
    direct = MMoE(FIELDS, num_dense=3, ctcvr_mode="direct").eval()
    assert "towers.ctcvr.out.weight" in direct.state_dict()
    p_ctr, p_ctcvr = direct.predict(sparse, dense)
    assert ((p_ctcvr > 0) & (p_ctcvr < 1)).all()
    with pytest.raises(ValueError, match="ctcvr_mode"):
        MMoE(FIELDS, ctcvr_mode="product")


def test_training_lowers_both_losses() -> None:
    torch.manual_seed(0)
    sparse, dense = _batch(256)
    click = (sparse[:, 2] >= 2).float()  # learnable from the genre field
    ctcvr = click * (sparse[:, 2] == 4).float()
    model = MMoE(FIELDS, num_dense=3, expert_hidden=(16,), tower_hidden=(8,), dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    first = None
    for _ in range(60):
        ctr_loss, ctcvr_loss = model.loss(sparse, dense, click, ctcvr)
        if first is None:
            first = (float(ctr_loss.detach()), float(ctcvr_loss.detach()))
        opt.zero_grad()
        (ctr_loss + ctcvr_loss).backward()
        opt.step()
    assert float(ctr_loss.detach()) < 0.5 * first[0] and float(ctcvr_loss.detach()) < 0.5 * first[1]
    assert torch.isfinite(ctcvr_loss)
