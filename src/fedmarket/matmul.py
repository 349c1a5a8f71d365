"""Which kernels compute fp32 matrix products on the CPU: ``train.matmul``.

PyTorch sends fp32 ``mm``/``addmm`` on the CPU to its BLAS (MKL in the wheels here) unless
``torch.backends.mkldnn.matmul.fp32_precision`` is ``"bf16"``, which routes them to oneDNN and *allows* it to
compute in bf16 where the CPU has fast bf16 matmul units (Intel AMX). On the AMD EPYC machines of this project
(AVX-512, no AMX) oneDNN keeps fp32 arithmetic there and is about 2× faster than MKL on the shapes that dominate a
sequential round (the catalog logits and their gradients: measured 0.57 → 0.26 ms for ``[128, 64] @ [64, 3706]``,
one thread), while MKL's result and oneDNN's are bit-equal when the inner dimension is short and differ in the
last fp32 bits otherwise (`benchmarks/seq_throughput.py` times a whole step both ways).

``train.matmul``:
- ``"auto"`` (default): oneDNN when a probe shows it computes in fp32 on this CPU (relative error of two fp32
  products against float64 below 1e-5; bf16 arithmetic would give ≈ 1e-3), else the BLAS: where oneDNN would
  compute in bf16 (as it does on AMX CPUs) the probe sees it and the BLAS stays.
- ``"blas"``: PyTorch's default BLAS path, as every record made before ``train.matmul`` existed (2026-11-30).
- ``"onednn"``: oneDNN whatever the probe says: on a CPU with AMX this may compute in bf16.

`use_matmul` sets the flag process-wide, like ``torch.set_num_threads``; `configure_torch` does both from
``train.threads`` and ``train.matmul`` and is what every entry point calls (`fedmarket.api.run_seed` and the
Flower ClientApp and ServerApp), so the in-process and Flower runs of one config on one machine use the same
threads and kernels.
"""

from __future__ import annotations

import math

import torch

from fedmarket.config import MATMUL_CHOICES
from fedmarket.errors import ConfigError

_PROBE: dict[str, float] = {}


def _flag():
    return torch.backends.mkldnn.matmul


def onednn_relative_error() -> float:
    """Largest relative error against float64 of two fp32 products computed with oneDNN allowed (the flag set
    for the probe only, then restored); measured once per process."""
    if "err" not in _PROBE:
        gen = torch.Generator().manual_seed(0)
        flag = _flag()
        old = flag.fp32_precision
        err = 0.0
        try:
            flag.fp32_precision = "bf16"
            # a short and a long inner dimension, and the shapes of a sequential step (batch × d, d × d,
            # text 384 → d): oneDNN may pick bf16 kernels for some shapes only, so every kind is probed
            for m, k, n in ((128, 64, 512), (64, 1024, 64), (32, 64, 64), (1600, 64, 64), (256, 384, 64)):
                a = torch.randn(m, k, generator=gen, dtype=torch.float32)
                b = torch.randn(k, n, generator=gen, dtype=torch.float32)
                ref = a.double() @ b.double()
                out = (a @ b).double()
                rel = ((out - ref).abs().max() / ref.abs().max()).item()
                err = max(err, rel if math.isfinite(rel) else math.inf)  # a NaN must not pass as 0
        finally:
            flag.fp32_precision = old
        _PROBE["err"] = err
    return _PROBE["err"]


def resolve_matmul(choice: str) -> str:
    """``"blas"`` or ``"onednn"`` for a ``train.matmul`` value (``"auto"`` decided by the probe)."""
    if choice not in MATMUL_CHOICES:
        raise ConfigError(f"train.matmul must be one of {list(MATMUL_CHOICES)}, got {choice!r}")
    if choice == "auto":
        return "onednn" if onednn_relative_error() < 1e-5 else "blas"
    return choice


def use_matmul(choice: str) -> str:
    """Route this process's fp32 CPU matmuls as ``choice`` says; returns the kernels chosen."""
    chosen = resolve_matmul(choice)
    _flag().fp32_precision = "bf16" if chosen == "onednn" else "ieee"
    return chosen


def configure_torch(threads: int, matmul: str) -> str:
    """This process's CPU threads and fp32 matmul kernels, from ``train.threads`` and ``train.matmul``; returns
    the kernels chosen (``"blas"`` or ``"onednn"``)."""
    torch.set_num_threads(threads)
    return use_matmul(matmul)
