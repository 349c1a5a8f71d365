import pytest
import torch

from fedmarket.models.ctr import DCNv2, DeepFM, build_ctr_model

FIELDS = {"user": 30, "user_gender": 3, "item": 40, "item_genre": 5}


@pytest.mark.parametrize("cls", [DeepFM, DCNv2])
def test_score_matrix_equals_pairwise_forward(cls):
    torch.manual_seed(0)
    model = cls(FIELDS, num_user_fields=2, embed_dim=8, hidden=(16, 8), dropout=0.3).eval()
    user_x = torch.stack([torch.arange(30), torch.randint(0, 3, (30,))], 1)
    item_x = torch.stack([torch.arange(40), torch.randint(0, 5, (40,))], 1)
    matrix = model.score_matrix(user_x, item_x, pair_chunk=97)
    u, i = torch.meshgrid(torch.arange(30), torch.arange(40), indexing="ij")
    pairs = torch.cat([user_x[u.ravel()], item_x[i.ravel()]], 1)
    torch.testing.assert_close(matrix, model(pairs).view(30, 40), atol=1e-5, rtol=1e-5)


def test_deepfm_learns_a_simple_rule():
    torch.manual_seed(0)
    model = DeepFM({"user": 20, "item": 20}, embed_dim=8, hidden=(16,))
    x = torch.stack([torch.randint(0, 20, (2000,)), torch.randint(0, 20, (2000,))], 1)
    y = ((x[:, 0] + x[:, 1]) % 2 == 0).float()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown CTR model"):
        build_ctr_model("widedeep", FIELDS, 2)
    with pytest.raises(ValueError, match="vocabulary size"):
        DeepFM({"user": 0, "item": 3})
    with pytest.raises(ValueError, match="num_user_fields"):
        DeepFM({"user": 3, "item": 3}, num_user_fields=2)
