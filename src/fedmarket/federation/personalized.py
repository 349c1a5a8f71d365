"""Personalised aggregators: pure functions over clients' updates (no state, no I/O).

Used by PF-MSMTrec (arXiv 2406.18938; reconstruction in METHODS.md, steps 4-5), per module (one expert,
one tower...):

* **conflict coordination** (PCGrad, Yu et al. NeurIPS 2020, Alg. 1, applied to client updates instead of
  task gradients): for client k and every other client j in a random order, if Δ_k·Δ_j < 0 then
  Δ_k ← Δ_k − (Δ_k·Δ_j / ‖Δ_j‖²) Δ_j, so no client's update undoes another's along their shared direction.
* **personalised aggregation**: client k receives θ̄_k = Σ_j w_kj θ_j with
  w_kj = softmax_j(cos(Δ_k, Δ_j) / τ): clients whose updates point the same way share more.

Δ_k is client k's update of the module (upload minus what it downloaded); θ_j = download_j + Δ'_j is
client j's coordinated model. Identical clients get identical personalised models; with personalisation
off, everyone gets the (example-weighted) mean of the coordinated models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedmarket.federation.payload import Payload


def flatten(payload: Payload, keys: Sequence[str]) -> np.ndarray:
    """The concatenation of ``payload[k].ravel()`` for ``keys`` (float64)."""
    if not keys:
        return np.zeros(0)
    return np.concatenate([np.asarray(payload[k], dtype=np.float64).ravel() for k in keys])


def unflatten(vector: np.ndarray, keys: Sequence[str], like: Payload) -> Payload:
    """Inverse of `flatten`: arrays shaped and typed like ``like[k]``."""
    out: Payload = {}
    offset = 0
    for k in keys:
        ref = np.asarray(like[k])
        out[k] = vector[offset : offset + ref.size].reshape(ref.shape).astype(ref.dtype)
        offset += ref.size
    return out


def project_conflicts(deltas: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """PCGrad over client updates ``deltas [K, P]``: each row loses its component along every other
    (original) row it conflicts with (negative dot product), visited in a random order per row (``rng``;
    ascending when None). Rows that do not conflict with anyone are returned unchanged.

    Computed in the span of the updates: every projected row is ``out_k = Σ_i A[k, i] Δ_i``, so the dot
    products PCGrad needs are ``A[k] · G[:, j]`` with the Gram matrix ``G = Δ Δᵀ``. Step s projects every
    row k against the s-th client of k's own order at once; the cost is one K×K×P product plus O(K³),
    instead of K² Python iterations over P-vectors."""
    deltas = np.asarray(deltas, dtype=np.float64)
    k_count = len(deltas)
    if k_count < 2:
        return deltas.copy()
    gram = deltas @ deltas.T
    sq_norms = np.diag(gram).copy()
    others = np.array([[j for j in range(k_count) if j != k] for k in range(k_count)])
    if rng is not None:
        others = np.stack([rng.permutation(row) for row in others])
    coef = np.eye(k_count)
    rows = np.arange(k_count)
    for step in range(k_count - 1):
        partner = others[:, step]
        dots = np.einsum("ki,ik->k", coef, gram[:, partner])
        norms = sq_norms[partner]
        conflict = (dots < 0) & (norms > 0)
        if conflict.any():
            coef[rows[conflict], partner[conflict]] -= dots[conflict] / norms[conflict]
    return coef @ deltas


def cosine_matrix(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Pairwise cosine similarity of rows; a zero row has similarity 0 with everything (itself included)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    unit = vectors / np.where(norms > eps, norms, 1.0)[:, None]
    unit[norms <= eps] = 0.0
    return unit @ unit.T


def similarity_weights(
    deltas: np.ndarray, tau: float = 1.0, sizes: Sequence[float] | None = None
) -> np.ndarray:
    """``W [K, K]`` with ``W[k, j] = softmax_j(cos(Δ_k, Δ_j) / τ)`` (times ``sizes[j]`` and renormalised
    when given). Rows sum to one."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    logits = cosine_matrix(deltas) / tau
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    if sizes is not None:
        w = w * np.asarray(sizes, dtype=np.float64)[None, :]
    return w / w.sum(axis=1, keepdims=True)


def personalized_aggregate(
    downloads: Sequence[Payload],
    uploads: Sequence[Payload],
    group_of: Callable[[str], str],
    *,
    tau: float = 1.0,
    coordinate: bool = True,
    personalize: bool = True,
    sizes: Sequence[float] | None = None,
    size_weighted: bool = False,
    rng: np.random.Generator | None = None,
) -> list[Payload]:
    """One personalised round over K clients, module by module (``group_of(key)`` names a key's module).

    ``downloads[k]`` is what client k started from, ``uploads[k]`` what it sent back (same keys). Returns
    client k's next download. ``coordinate``: PCGrad projection of conflicting updates; ``personalize``:
    similarity-weighted rows (else one ``sizes``-weighted mean for everyone).
    """
    if len(downloads) != len(uploads) or not uploads:
        raise ValueError("personalized_aggregate needs one download per upload and at least one client")
    keys = list(uploads[0])
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(group_of(key), []).append(key)
    k_count = len(uploads)
    weights = np.ones(k_count) if sizes is None else np.asarray(sizes, dtype=np.float64)
    out: list[Payload] = [{} for _ in range(k_count)]
    for group_keys in groups.values():
        start = np.stack([flatten(d, group_keys) for d in downloads])
        end = np.stack([flatten(u, group_keys) for u in uploads])
        deltas = end - start
        moved = project_conflicts(deltas, rng) if coordinate else deltas
        models = start + moved
        if personalize:
            w = similarity_weights(deltas, tau, weights if size_weighted else None)
            merged = w @ models
        else:
            mean = (weights / weights.sum()) @ models
            merged = np.repeat(mean[None, :], k_count, axis=0)
        for k in range(k_count):
            out[k].update(unflatten(merged[k], group_keys, uploads[0]))
    return out
