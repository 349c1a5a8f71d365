"""The shared local training loop (`fedmarket.methods.epochs`) changes no number: each trainer's epoch against
the loop it ran before the loop was shared, bit for bit (losses, parameters, optimizer state). The multi-task
trainer is checked the same way by tests/test_mtl_perf_equivalence.py (its legacy reference keeps its own loop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmarket.data.split import leave_one_out, market_seed
from fedmarket.data.synthetic import make_synthetic_markets
from fedmarket.federation.payload import UploadDeclaration
from fedmarket.methods.ctr_trainer import CTRClient, CTRData
from fedmarket.methods.epochs import EpochLoss, Proximal, proximal_term, run_epochs, tied_parameters
from fedmarket.methods.seq_trainer import SeqClient, SeqData, SeqOptions
from fedmarket.models.rqvae import DualCodebookRQVAE
from fedmarket.models.text_encoder import encode_texts


@pytest.fixture(scope="module")
def split():
    market = next(iter(make_synthetic_markets(1, [40], 50, (6, 12), with_text=True, seed=7).values()))
    return leave_one_out(market, num_candidates=20, split_seed=1)


def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# ----------------------------------------------------------------------------------- the loops as they were
def legacy_ctr_epoch(client: CTRClient, seed: int, server_round: int, epoch: int, anchor: dict, mu: float):
    users, items, labels = client.epoch_instances(seed, server_round, epoch)
    users_t, items_t, labels_t = torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(labels)
    client.model.train()
    total, count = 0.0, 0
    for s in range(0, len(users), client.batch_size):
        e = s + client.batch_size
        logits = client.model(client.batch_x(users_t[s:e], items_t[s:e]))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels_t[s:e])
        total += float(loss.detach()) * len(logits)
        count += len(logits)
        if anchor:
            params = dict(client.model.named_parameters())
            loss = loss + 0.5 * mu * sum(
                (params[k] - a).pow(2).sum() for k, a in anchor.items() if k in params
            )
        client.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        client.optimizer.step()
    return total / max(1, count)


def legacy_seq_epoch(client: SeqClient, seed: int, server_round: int, epoch: int) -> float:
    rng = np.random.default_rng(market_seed(seed, client.market, server_round, epoch))
    torch.manual_seed(int(rng.integers(0, 2**31 - 1)))
    perm = torch.from_numpy(rng.permutation(len(client.data.train_inputs)))
    client.model.train()
    total, count = 0.0, 0
    for s in range(0, len(perm), client.batch_size):
        idx = perm[s : s + client.batch_size]
        loss = client.batch_loss(client.data.train_inputs[idx], client.data.train_targets[idx])
        client.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        client.optimizer.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    return total / max(1, count)


def legacy_rqvae_epochs(model, x: torch.Tensor, seed: int, epochs: int, batch_size: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    model.train()
    recon = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            out = model(x[perm[s : s + batch_size]])
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            recon.append(float(out["recon"]))
    return recon


# ----------------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("mu", [0.0, 0.05])
def test_ctr_epoch_is_the_legacy_loop(split, mu):
    def client():
        data = CTRData.from_split(split)
        return CTRClient("m0", data, UploadDeclaration(("dnn.*", "head.*")), batch_size=32, seed=3)

    new, old = client(), client()
    anchor = {k: v.detach().clone() + 0.01 for k, v in new.model.named_parameters() if k.startswith("dnn")}
    for epoch in range(2):
        a = new.train_epoch(0, 1, epoch, anchor if mu else {}, mu)
        b = legacy_ctr_epoch(old, 0, 1, epoch, anchor if mu else {}, mu)
        assert a == b
    assert _same_state(new.state_dict(), old.state_dict())


def test_seq_epoch_is_the_legacy_loop(split):
    def client():
        text = encode_texts(split.market.item_text, "hashing")
        data = SeqData.from_split(split, max_len=8, text_vectors=text)
        opts = SeqOptions(text_encoder="hashing", hidden_dim=16, max_len=8, loss="s2ce")
        return SeqClient("m0", data, UploadDeclaration(()), opts, batch_size=16, seed=2)

    new, old = client(), client()
    for epoch in range(2):
        assert new.train_epoch(0, 2, epoch) == legacy_seq_epoch(old, 0, 2, epoch)
    assert _same_state(new.state_dict(), old.state_dict())


def test_rqvae_epochs_are_the_legacy_loop():
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((70, 6)).astype(np.float32))

    def model():
        torch.manual_seed(5)
        m = DualCodebookRQVAE(6, 4, (8,), 8, 4)
        m.init_codebooks(x, 11)
        return m

    new, old = model(), model()
    gen = torch.Generator().manual_seed(9)
    optimizer = torch.optim.Adam(new.parameters(), lr=0.001)

    def batches(_epoch):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), 16):
            yield x[perm[s : s + 16]]

    def loss_fn(batch):
        out = new(batch)
        return out["loss"], out["recon"], len(batch)

    record = run_epochs(new, optimizer, batches, loss_fn, epochs=3)
    recon = [v for epoch in record for v in epoch.values]
    assert recon == legacy_rqvae_epochs(old, x, 9, 3, 16)
    assert _same_state(new.state_dict(), old.state_dict())


def test_proximal_term_and_when_it_applies():
    model = torch.nn.Linear(3, 2)
    anchor = {"weight": torch.zeros(2, 3), "missing": torch.zeros(1)}
    tied = tied_parameters(model, anchor)
    assert [a is anchor["weight"] for _, a in tied] == [True]
    expected = 0.5 * 0.1 * model.weight.pow(2).sum()
    assert torch.equal(proximal_term(tied, 0.1), expected)
    assert Proximal.of(model, anchor, 0.0) is None
    assert Proximal.of(model, {}, 0.1) is None
    assert Proximal.of(model, {"missing": torch.zeros(1)}, 0.1) is None
    assert torch.equal(Proximal.of(model, anchor, 0.1)(), expected)


def test_epoch_loss_is_size_weighted():
    assert EpochLoss([1.0, 4.0], [3, 1]).mean == 7.0 / 4
    assert EpochLoss().mean == 0.0
