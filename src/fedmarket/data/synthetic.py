"""Synthetic markets with a shared latent structure and market-specific drift (for tests and for showing
where each method helps; never a headline result, DATA.md).

Generative story, per market ``m``:

1. A global set of ``num_concepts`` latent item concepts ``z_c`` (and popularities ``p_c``) is shared by all
   markets. Market ``m`` stocks ``items_per_market`` of them; its item ``j`` of concept ``c`` has the vector
   ``v_j ∝ s·z_c + (1−s)·d_j`` with market-specific drift ``d_j`` and ``s = similarity`` (rescaled to unit
   variance, so ``similarity`` changes how shared the structure is, not how peaked preferences are).
   ``similarity=1``: the same concept means the same item everywhere; ``0``: markets are unrelated.
2. Users have tastes ``u ~ N(μ_m, I)`` with a market taste shift ``μ_m`` of size ``(1−s)``.
3. Each user interacts with ``n ~ U[interactions_per_user]`` distinct items, drawn without replacement with
   probabilities ``softmax(sharpness·u·v/√d + popularity)`` (Gumbel top-k), at increasing times; rows are in
   time order.
4. Ratings 1-5 come from a second affinity ``(1−t)·u·v + t·u·w_c`` (``t = task_conflict``, ``w_c`` a second
   shared concept vector): with ``t=0`` what users rate highly is what they click, with ``t=1`` the two tasks
   pull apart (the knob for multi-task conflict; conversion = rating 5, as in the MovieLens proxy).

IDs are disjoint (raw ids ``m0_u3``, ``m0_i7``); the concept behind each local item is
``meta["item_concepts"]`` (analysis only, like ASINs on real data). ``with_text`` gives every item a text made
from its concept (a pseudo-word name plus tags of its strongest latent dimensions), identical across markets
for the same concept, like a real title. Randomness is derived from ``(seed, market index)``, so adding
markets does not change the existing ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmarket.data.market import MarketData
from fedmarket.errors import DataError

_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ren",
    "su",
    "ta",
    "vo",
    "zel",
    "ni",
    "pra",
    "qu",
    "dor",
    "fe",
    "gi",
    "hu",
    "ja",
)
_BASE_TIME = 1_600_000_000  # Unix seconds; only the order matters


def _concept_text(concept: int, vector: np.ndarray) -> str:
    name = "".join(_SYLLABLES[(concept >> (4 * k)) & 15] for k in range(3))
    strongest = np.argsort(-np.abs(vector))[:2]
    tags = ", ".join(f"dim{k}-{'high' if vector[k] > 0 else 'low'}" for k in strongest)
    return f"{name.capitalize()}. Tags: {tags}"


def make_synthetic_markets(
    num_markets: int = 4,
    users_per_market: int | Sequence[int] = 300,
    items_per_market: int = 200,
    interactions_per_user: tuple[int, int] = (8, 20),
    latent_dim: int = 8,
    similarity: float = 0.8,
    seed: int = 0,
    with_text: bool = False,
    num_concepts: int | None = None,
    task_conflict: float = 0.0,
    sharpness: float = 2.0,
) -> dict[str, MarketData]:
    """Markets ``m0``, ``m1``, … drawn from the story in the module docstring.

    Args:
        users_per_market: one size for all, or one per market (to make small, data-poor markets).
        num_concepts: size of the shared concept pool; default ``1.5 × items_per_market``, so two markets
            share about two thirds of their concepts.
    """
    sizes = [int(users_per_market)] * num_markets if np.isscalar(users_per_market) else list(users_per_market)
    low, high = (int(v) for v in interactions_per_user)
    num_concepts = int(num_concepts or round(1.5 * items_per_market))
    if num_markets < 1 or len(sizes) != num_markets or min(sizes) < 1:
        raise DataError(
            f"synthetic: need num_markets >= 1 and one positive user count per market, got {sizes}"
        )
    if not 0.0 <= similarity <= 1.0 or not 0.0 <= task_conflict <= 1.0:
        raise DataError("synthetic: similarity and task_conflict must lie in [0, 1]")
    if not 1 <= low <= high < items_per_market or num_concepts < items_per_market:
        raise DataError(
            f"synthetic: need 1 <= interactions_per_user[0] <= [1] < items_per_market <= num_concepts, "
            f"got {interactions_per_user}, {items_per_market}, {num_concepts}"
        )

    shared = np.random.default_rng([seed, 0])
    concepts = shared.normal(size=(num_concepts, latent_dim))
    conversion_concepts = shared.normal(size=(num_concepts, latent_dim))
    popularity = shared.normal(scale=0.7, size=num_concepts)
    mix = np.hypot(similarity, 1.0 - similarity)  # keeps unit variance of the mixed vectors

    markets: dict[str, MarketData] = {}
    for index, num_users in enumerate(sizes):
        name = f"m{index}"
        rng = np.random.default_rng([seed, 1, index])
        concept_ids = rng.choice(num_concepts, size=items_per_market, replace=False)
        drift = rng.normal(size=(items_per_market, latent_dim))
        items = (similarity * concepts[concept_ids] + (1.0 - similarity) * drift) / mix
        item_bias = (
            similarity * popularity[concept_ids]
            + (1.0 - similarity) * rng.normal(scale=0.7, size=items_per_market)
        ) / mix
        conv_drift = rng.normal(size=(items_per_market, latent_dim))
        conv_items = (similarity * conversion_concepts[concept_ids] + (1.0 - similarity) * conv_drift) / mix
        taste_shift = (1.0 - similarity) * rng.normal(size=latent_dim)
        users = rng.normal(size=(num_users, latent_dim)) + taste_shift

        scale = sharpness / np.sqrt(latent_dim)
        logits = scale * users @ items.T + item_bias
        perturbed = logits + rng.gumbel(size=logits.shape)
        ranked = np.argsort(-perturbed, axis=1)
        counts = rng.integers(low, high + 1, size=num_users)
        user_col = np.repeat(np.arange(num_users), counts)
        # the first `count` of a Gumbel-perturbed ranking = sampling without replacement ∝ softmax(logits);
        # then shuffle within the user so the time order is not the preference order
        picked = np.concatenate([rng.permutation(ranked[u, :c]) for u, c in enumerate(counts)])
        starts = rng.integers(0, 180 * 86_400, size=num_users)
        gaps = rng.exponential(86_400.0, size=len(user_col)).astype(np.int64) + 1
        # per-user running sums of the gaps: the global running sum minus its value before the user's first row
        running = np.cumsum(gaps)
        first_row = np.repeat(np.cumsum(counts) - counts, counts)
        offsets = running - running[first_row] + gaps[first_row]
        timestamps = _BASE_TIME + starts[user_col] + offsets

        conv = (1.0 - task_conflict) * np.einsum("nd,nd->n", users[user_col], items[picked])
        conv = conv + task_conflict * np.einsum("nd,nd->n", users[user_col], conv_items[picked])
        conv = conv + rng.normal(scale=0.5, size=len(conv))
        z = (conv - conv.mean()) / (conv.std() + 1e-9)
        ratings = (np.digitize(z, [-1.0, -0.3, 0.4, 1.0]) + 1).astype(np.float32)

        order = np.argsort(timestamps, kind="stable")
        markets[name] = MarketData(
            name=name,
            users=user_col[order],
            items=picked[order],
            timestamps=timestamps[order],
            ratings=ratings[order],
            user_ids=np.asarray([f"{name}_u{u}" for u in range(num_users)], dtype=object),
            item_ids=np.asarray([f"{name}_i{j}" for j in range(items_per_market)], dtype=object),
            item_text=[_concept_text(int(c), concepts[c]) for c in concept_ids] if with_text else None,
            meta={
                "synthetic": True,
                "seed": seed,
                "similarity": similarity,
                "task_conflict": task_conflict,
                "item_concepts": concept_ids,
            },
        )
    return markets
