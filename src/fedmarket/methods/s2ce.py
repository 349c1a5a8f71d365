"""Semantic Soft Cross-Entropy (S²CE), FeCoSR step 3 (METHODS.md).

Plain cross-entropy pushes every non-target item away equally; in federated optimisation over
heterogeneous markets that amplifies their differences. S²CE softens the target with the frozen text
semantics, which every market shares:

    q_j ∝ exp(cos(t_target, t_j) / τ)            over the market's own catalog (optionally its top-k)
    L   = (1 − λ)·CE(p, target) + λ·(−Σ_j q_j log p_j)

with p = softmax(logits). λ = 0 is CE exactly; λ = 1 is pure soft-CE.

Choices (options): ``top_k`` > 0 keeps only the k most similar items (the target included) and
renormalises, which bounds how far the mass spreads (the first prototype found τ = 0.1 over the whole
catalog spread it over hundreds of items); ``whiten`` computes the cosines on PCA-whitened, re-normalised
text vectors (sentence vectors are anisotropic: raw cosines are high for almost every pair). The target is
forced to be the strict argmax of q (its similarity is set to ``1 + margin`` above any other), so items
with identical text cannot take the target's place.

The soft targets depend only on the market's own text vectors and are precomputed once: a dense
``[N, N]`` matrix for small catalogs, or (index, weight) pairs of the top-k per item.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DENSE_LIMIT = 20_000  # catalogs above this need top_k (an N×N float32 matrix would exceed ~1.6 GB)
TARGET_MARGIN = 1e-3


def whiten_vectors(vectors: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """PCA-whitened (zero mean, identity covariance), then L2-normalised rows."""
    x = vectors.astype(np.float64) - vectors.mean(0, keepdims=True)
    cov = x.T @ x / max(1, len(x) - 1)
    values, vecs = np.linalg.eigh(cov)
    w = x @ vecs / np.sqrt(np.maximum(values, 0) + eps)
    w /= np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    return w.astype(np.float32)


@dataclass
class SoftTargets:
    """Precomputed q for every possible target item: dense ``weights [N, N]`` (``indices`` None) or
    sparse top-k ``indices [N, k]`` / ``weights [N, k]``."""

    weights: torch.Tensor
    indices: torch.Tensor | None

    @classmethod
    def build(
        cls,
        text_vectors: np.ndarray | torch.Tensor,
        tau: float = 0.1,
        top_k: int = 0,
        whiten: bool = False,
        chunk: int = 2048,
    ) -> SoftTargets:
        t = np.asarray(text_vectors, dtype=np.float32)
        t = whiten_vectors(t) if whiten else t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
        n = len(t)
        k = n if top_k <= 0 else min(top_k, n)
        if k == n and n > DENSE_LIMIT:
            raise ValueError(
                f"catalog of {n} items: set top_k for S²CE (dense soft targets limited to {DENSE_LIMIT})"
            )
        tt = torch.from_numpy(t)
        rows_w, rows_i = [], []
        for start in range(0, n, chunk):
            sim = tt[start : start + chunk] @ tt.T  # cosines [c, N]
            rows = torch.arange(sim.shape[0])
            targets = torch.arange(start, start + sim.shape[0])
            sim[rows, targets] = sim.max(dim=1).values.clamp(min=1.0) + TARGET_MARGIN
            if k < n:
                sim, idx = sim.topk(k, dim=1)
                rows_i.append(idx)
            rows_w.append(torch.softmax(sim / tau, dim=1))
        weights = torch.cat(rows_w)
        return cls(weights, torch.cat(rows_i) if rows_i else None)

    def dense(self, targets: torch.Tensor) -> torch.Tensor:
        """``q`` rows for ``targets`` as a dense ``[P, N]`` distribution (tests and small uses)."""
        if self.indices is None:
            return self.weights[targets]
        n = len(self.weights)
        q = torch.zeros(len(targets), n, dtype=self.weights.dtype)
        return q.scatter_(1, self.indices[targets], self.weights[targets])

    def target_mass(self) -> float:
        """Mean over target items of q(target): how much of the soft target stays on the true item (the
        mixed target of the loss keeps (1 − λ) + λ·this)."""
        n = len(self.weights)
        if self.indices is None:
            return float(self.weights.diagonal().mean())
        hit = self.indices == torch.arange(n).unsqueeze(1)
        return float((self.weights * hit).sum(1).mean())

    def soft_ce(self, log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over rows of −Σ_j q_j log p_j."""
        if self.indices is None:
            return -(self.weights[targets] * log_probs).sum(1).mean()
        picked = log_probs.gather(1, self.indices[targets])
        return -(self.weights[targets] * picked).sum(1).mean()


def s2ce_loss(
    logits: torch.Tensor, targets: torch.Tensor, soft: SoftTargets | None, lam: float = 0.5
) -> torch.Tensor:
    """(1 − λ)·CE + λ·soft-CE over ``logits [P, N]`` and target item indices ``targets [P]``.
    With λ = 0 (or no soft targets) this is ``F.cross_entropy`` exactly."""
    if lam == 0 or soft is None:
        return F.cross_entropy(logits, targets)
    log_probs = F.log_softmax(logits, dim=1)
    ce = F.nll_loss(log_probs, targets)
    if lam == 1:
        return soft.soft_ce(log_probs, targets)
    return (1 - lam) * ce + lam * soft.soft_ce(log_probs, targets)


# ------------------------------------------------------------------------------ fused linear loss
class _FusedLinearS2CE(torch.autograd.Function):
    """``s2ce_loss(h @ table.T, targets, soft, lam)`` and its gradients, a chunk of rows at a time.

    With the mixed target ``y = (1 − λ)·onehot + λ·q`` (a distribution) every row's loss is
    ``logsumexp(l) − y·l`` and ``∂/∂l = softmax(l) − y``. Each chunk of ``[chunk, N]`` logits is made,
    used for both the loss and ``∂h`` / ``∂table``, and dropped while it is still in cache: the ``[P, N]``
    logits of the unfused path (and their softmax and gradient, three passes over memory) never exist.
    The gradients are computed in the forward pass and scaled by the incoming gradient in backward.
    """

    @staticmethod
    def forward(ctx, h, table, targets, soft, lam, chunk):
        n = h.shape[0]
        want = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want else None
        grad_t = torch.zeros_like(table) if want else None
        total = h.new_zeros((), dtype=torch.float64)
        use_soft = soft is not None and lam > 0
        hard = 1.0 - lam if use_soft else 1.0
        for start in range(0, n, chunk):
            hc = h[start : start + chunk]
            items = targets[start : start + chunk]
            tc = items.unsqueeze(1)
            logits = hc @ table.T
            picked = logits.gather(1, tc).squeeze(1) * hard  # (1 − λ)·l_target
            if use_soft:
                if soft.indices is None:
                    q = soft.weights[items]
                    picked = picked + lam * (q * logits).sum(1)
                else:
                    idx, w = soft.indices[items], soft.weights[items]
                    picked = picked + lam * (w * logits.gather(1, idx)).sum(1)
            # logsumexp and softmax from one exp pass, in place of the logits
            peak = logits.amax(dim=1, keepdim=True)
            expo = logits.sub_(peak).exp_()
            mass = expo.sum(dim=1, keepdim=True)
            lse = (peak + mass.log()).squeeze(1)
            total += (lse - picked).sum(dtype=torch.float64)
            if not want:
                continue
            grad = expo.div_(mass)  # softmax
            grad.scatter_add_(1, tc, grad.new_full(tc.shape, -hard))
            if use_soft:
                if soft.indices is None:
                    grad.sub_(q, alpha=lam)
                else:
                    grad.scatter_add_(1, idx, w * -lam)
            grad.div_(n)
            torch.mm(grad, table, out=grad_h[start : start + chunk])
            grad_t.addmm_(grad.T, hc)
        ctx.save_for_backward(grad_h, grad_t)
        return (total / max(1, n)).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_t = ctx.saved_tensors
        return grad_h * grad_out, grad_t * grad_out, None, None, None, None


def fused_s2ce_loss(
    h: torch.Tensor,
    table: torch.Tensor,
    targets: torch.Tensor,
    soft: SoftTargets | None,
    lam: float = 0.5,
    chunk: int = 128,
) -> torch.Tensor:
    """``s2ce_loss(h @ table.T, targets, soft, lam)`` without the ``[P, N]`` logits: equal up to float
    rounding (summation order), about twice as fast on the catalog softmax on CPU (`benchmarks/
    seq_throughput.py`). ``h [P, d]`` states at the real positions, ``table [N, d]`` the item table."""
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    if h.dim() != 2 or table.dim() != 2 or h.shape[1] != table.shape[1]:
        raise ValueError(f"h {tuple(h.shape)} and table {tuple(table.shape)} must be [P, d] and [N, d]")
    return _FusedLinearS2CE.apply(h, table, targets, soft, float(lam), int(chunk))
