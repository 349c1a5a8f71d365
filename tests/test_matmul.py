"""train.matmul (`fedmarket.matmul`): which kernels compute fp32 CPU matmuls, chosen so precision never drops."""

from __future__ import annotations

import pytest
import torch

from fedmarket import matmul
from fedmarket.config import config_from_dict
from fedmarket.errors import ConfigError


@pytest.fixture(autouse=True)
def _restore_flag():
    flag = torch.backends.mkldnn.matmul
    old = flag.fp32_precision
    yield
    flag.fp32_precision = old


def test_choices_set_the_flag_and_bad_values_are_named():
    assert matmul.use_matmul("blas") == "blas"
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    assert matmul.use_matmul("onednn") == "onednn"
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
    with pytest.raises(
        ConfigError, match=r"train\.matmul must be one of \['auto', 'blas', 'onednn'\], got 'gpu'"
    ):
        matmul.use_matmul("gpu")
    with pytest.raises(ConfigError, match=r"train\.matmul must be one of .*got 'fast'"):
        config_from_dict({"name": "x", "dataset": {"name": "synthetic"}, "train": {"matmul": "fast"}})


def test_auto_takes_onednn_only_where_it_computes_in_fp32(monkeypatch):
    monkeypatch.setitem(matmul._PROBE, "err", 2e-3)  # what bf16 arithmetic gives (a CPU with AMX)
    assert matmul.resolve_matmul("auto") == "blas"
    monkeypatch.setitem(matmul._PROBE, "err", 3e-7)
    assert matmul.resolve_matmul("auto") == "onednn"


def test_the_probe_measures_and_restores_the_flag(monkeypatch):
    monkeypatch.setattr(matmul, "_PROBE", {})
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    err = matmul.onednn_relative_error()
    assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    assert 0 <= err < 0.05  # fp32 (≈ 1e-7) or bf16 (≈ 1e-3) arithmetic, never garbage
    assert matmul._PROBE == {"err": err}


def test_a_probe_that_gives_nan_counts_as_imprecise(monkeypatch):
    monkeypatch.setattr(matmul, "_PROBE", {})
    real_matmul = torch.Tensor.__matmul__

    def nan_when_fp32(self, other):
        out = real_matmul(self, other)
        return out * float("nan") if out.dtype == torch.float32 else out

    monkeypatch.setattr(torch.Tensor, "__matmul__", nan_when_fp32)
    assert matmul.onednn_relative_error() == float("inf")
    monkeypatch.setattr(torch.Tensor, "__matmul__", real_matmul)
    assert matmul.resolve_matmul("auto") == "blas"


def test_auto_keeps_fp32_accuracy_on_the_catalog_shapes():
    """Whatever auto picks on this machine, the products a sequential round spends its time on (catalog logits
    and both gradients) stay within fp32 rounding of float64."""
    matmul.use_matmul("auto")
    gen = torch.Generator().manual_seed(1)
    h, table, g = (
        torch.randn(128, 64, generator=gen),
        torch.randn(3706, 64, generator=gen),
        torch.randn(128, 3706, generator=gen),
    )
    for out, ref in (
        (h @ table.T, h.double() @ table.double().T),
        (g @ table, g.double() @ table.double()),
        (g.T @ h, g.double().T @ h.double()),
    ):
        assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_a_sequential_step_is_the_same_either_way():
    """One FeCoSR training loss and its gradients with the BLAS and with oneDNN: equal to fp32 rounding,
    wherever oneDNN computes in fp32. On a CPU where it computes in bf16 (Intel AMX) forcing it differs by
    ~1 %, so there is nothing to compare; `auto` then keeps the BLAS (asserted)."""
    if matmul.onednn_relative_error() >= 1e-5:
        assert matmul.resolve_matmul("auto") == "blas"
        pytest.skip("oneDNN computes fp32 matmuls in bf16 on this CPU; auto keeps the BLAS here")
    from fedmarket.data import leave_one_out
    from fedmarket.data.synthetic import make_synthetic_markets
    from fedmarket.federation.payload import UploadDeclaration
    from fedmarket.methods.seq_trainer import SeqClient, SeqData, SeqOptions
    from fedmarket.models.text_encoder import encode_texts

    market = make_synthetic_markets(1, [60], 80, (6, 14), with_text=True, seed=3)
    split = leave_one_out(next(iter(market.values())), num_candidates=20, split_seed=1)
    opts = SeqOptions(text_encoder="hashing", loss="s2ce", dropout=0.0)
    data = SeqData.from_split(split, opts.max_len, encode_texts(split.market.item_text, "hashing"))
    results = []
    for choice in ("blas", "onednn"):
        matmul.use_matmul(choice)
        torch.manual_seed(0)
        client = SeqClient(split.market.name, data, UploadDeclaration(()), opts)
        client.model.train()
        loss = client.batch_loss(data.train_inputs[:32], data.train_targets[:32])
        loss.backward()
        results.append(
            (loss.item(), [p.grad.clone() for p in client.model.parameters() if p.grad is not None])
        )
    (la, ga), (lb, gb) = results
    assert la == pytest.approx(lb, rel=1e-5)
    assert len(ga) == len(gb) > 0
    for a, b in zip(ga, gb, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_configure_torch_sets_threads_and_kernels_together():
    threads = torch.get_num_threads()
    try:
        assert matmul.configure_torch(1, "blas") == "blas"
        assert torch.get_num_threads() == 1
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert matmul.configure_torch(2, "onednn") == "onednn"
        assert torch.get_num_threads() == 2
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        with pytest.raises(ConfigError, match=r"train\.matmul must be one of .*got 'gpu'"):
            matmul.configure_torch(1, "gpu")
    finally:
        torch.set_num_threads(threads)
