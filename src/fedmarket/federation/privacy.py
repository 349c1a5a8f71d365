"""Client-level differential privacy for any federated method: clipping, Gaussian noise, RDP accounting.

The unit of privacy is a **market** (client-level DP, McMahan et al., "Learning Differentially Private
Recurrent Language Models", ICLR 2018, DP-FedAvg): two runs are neighbours when one market's whole data
is added or removed. Each round:

1. Every market trains as usual; its update is the delta from what it downloaded, Δ_k = θ_k − θ_down.
   The delta is clipped in the market, Δ̄_k = Δ_k · min(1, C / ‖Δ_k‖₂) (``clipping: flat``), or key by key
   to C/√K each so the whole still has norm ≤ C (``clipping: per_key``; keeps a large array, e.g. a
   codebook usage vector, from eating the budget of the others).
2. Noise, in one of two places:
   - ``mode: server`` (central DP, trusted aggregator; Flower's "client-side fixed clipping"): markets
     upload Δ̄_k; the server forms Δ = (Σ_k Δ̄_k + N(0, σ²C²·I)) / m over the m selected markets and
     every market's next download is θ_down + Δ. Sensitivity of the sum to adding or removing a market
     is C, so each round is a Gaussian mechanism with noise multiplier σ (sub-sampled with q =
     client_fraction when markets are sampled).
   - ``mode: client`` (local DP, untrusted server): each market uploads θ_down + Δ̄_k + N(0, σ²C²·I) and the
     server aggregates as the method normally does. Two possible datasets of one market give deltas at
     most 2C apart, so each upload is a Gaussian mechanism with noise multiplier σ/2 against the server
     itself; the reported ε is that of the market that uploaded most often.
3. An accountant composes the rounds: by default (``accountant: pld``) dp-accounting's privacy-loss
   distribution accountant (tight up to its discretisation; about 10 % below RDP at σ 1, 10 rounds), or
   (``accountant: rdp``) the RDP accountant here (Mironov 2017; sampled Gaussian: Mironov, Talwar & Zhang
   2019; conversion to (ε, δ) with Balle et al. 2020, Thm 21, as Opacus and dp-accounting do).
   ε after every round goes into ``rounds.csv`` and ``metrics.json``; ``target_epsilon`` stops training
   before the round that would exceed it.

The server step in ``mode: server`` is a uniform mean of clipped deltas (the example-count weights of
FedAvg would make the sensitivity data-dependent). To stay generic it hands the wrapped strategy one
identical update per market (θ_down + Δ), so any strategy whose server step returns the common value of
identical inputs (FedAvg's weighted mean, median, trimmed mean, FedMM's usage-weighted codebook merge)
continues unchanged. A personalised strategy then receives no per-market signal: DP here reduces it to a
shared mean, which the run report says.

Sampling: the runtime draws k = max(min_markets, ⌈client_fraction·n⌉) of n markets a round
(`fedmarket.federation.runtime.select_markets`), so the rate that runs is k/n, not ``client_fraction``.
Amplification by sampling holds only when the draw is secret; with ``privacy.secret_sampling`` the draw uses
OS randomness (recorded in the checkpoint for resume) and ε is accounted with q = k/n (a fixed-size draw
treated as Poisson sampling, the approximation TensorFlow Federated and Flower make). Otherwise the draw
comes from the config's public seed, anyone can predict it, and ε is accounted with q = 1 (the report says
so). See `accounted_sampling`.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmarket.data.split import market_seed
from fedmarket.errors import PayloadError
from fedmarket.federation.core import (
    ClientTrainer,
    RoundConfig,
    Strategy,
    StrategyWrapper,
    TrainerWrapper,
    Update,
)
from fedmarket.federation.payload import Payload

log = logging.getLogger(__name__)

# Integer orders: the sampled Gaussian's RDP has a closed form there (the binomial expansion below).
DEFAULT_ORDERS: tuple[float, ...] = tuple(range(2, 65)) + (80, 96, 128, 160, 192, 256, 384, 512)


# ------------------------------------------------------------------------------------------ accountant
def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def rdp_sampled_gaussian(q: float, noise_multiplier: float, orders: Sequence[float]) -> np.ndarray:
    """RDP ε(α) of one step of the sampled Gaussian mechanism (sensitivity 1, noise std σ).

    q = 1: ε(α) = α / (2σ²) (Mironov 2017, Prop. 7). 0 < q < 1, integer α (Mironov, Talwar & Zhang 2019,
    eq. for A_α): ε(α) = log A_α / (α − 1) with A_α = Σ_{k=0}^{α} C(α,k) (1−q)^{α−k} q^k exp((k² − k)/(2σ²)).
    σ = 0 gives ε = ∞ (no noise, no guarantee).
    """
    orders = [float(a) for a in orders]
    if q < 0 or q > 1:
        raise ValueError(f"sampling rate must be in [0, 1], got {q}")
    if q == 0:
        return np.zeros(len(orders))
    if noise_multiplier <= 0:
        return np.full(len(orders), np.inf)
    s2 = noise_multiplier**2
    if q == 1:
        return np.array([a / (2 * s2) for a in orders])
    out = []
    for alpha in orders:
        if alpha != int(alpha):
            raise ValueError(f"sub-sampled Gaussian RDP needs integer orders, got {alpha}")
        a = int(alpha)
        log_a = -math.inf
        for k in range(a + 1):
            term = (
                math.lgamma(a + 1)
                - math.lgamma(k + 1)
                - math.lgamma(a - k + 1)
                + (a - k) * math.log1p(-q)
                + k * math.log(q)
                + (k * k - k) / (2 * s2)
            )
            log_a = _log_add(log_a, term)
        out.append(log_a / (a - 1))
    return np.array(out)


def epsilon_from_rdp(rdp: np.ndarray, orders: Sequence[float], delta: float) -> tuple[float, float]:
    """(ε, best order) at ``delta`` from composed RDP values (Balle et al. 2020, Thm 21):
    ε = min_α  RDP(α) + log((α−1)/α) − (log δ + log α)/(α − 1)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, dtype=np.float64)
    rdp = np.asarray(rdp, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        eps = rdp + np.log((a - 1) / a) - (np.log(delta) + np.log(a)) / (a - 1)
    eps = np.where(np.isnan(eps), np.inf, eps)
    i = int(np.argmin(eps))
    return max(0.0, float(eps[i])), float(a[i])


@dataclass
class RDPAccountant:
    """Composes steps of the (sampled) Gaussian mechanism: RDP adds up over steps at each order."""

    orders: tuple[float, ...] = DEFAULT_ORDERS
    rdp: np.ndarray = field(default=None)  # type: ignore[assignment]
    steps: int = 0

    def __post_init__(self) -> None:
        if self.rdp is None:
            self.rdp = np.zeros(len(self.orders))

    def step(self, q: float, noise_multiplier: float, count: int = 1) -> None:
        self.rdp = self.rdp + count * rdp_sampled_gaussian(q, noise_multiplier, self.orders)
        self.steps += count

    def epsilon(self, delta: float) -> float:
        return epsilon_from_rdp(self.rdp, self.orders, delta)[0]

    def epsilon_after(self, q: float, noise_multiplier: float, delta: float, count: int = 1) -> float:
        """ε if ``count`` more steps were taken (for stopping before a target is exceeded)."""
        rdp = self.rdp + count * rdp_sampled_gaussian(q, noise_multiplier, self.orders)
        return epsilon_from_rdp(rdp, self.orders, delta)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"orders": list(self.orders), "rdp": self.rdp.tolist(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.orders = tuple(state["orders"])
        self.rdp = np.asarray(state["rdp"], dtype=np.float64)
        self.steps = int(state["steps"])


class PLDAccountant:
    """The same composition through dp-accounting's PLD accountant (``pip install dp-accounting``, the
    ``privacy`` extra). Steps are kept as counts per (q, σ), and ε is recomputed from them (memoised): one
    composition of n identical rounds costs about a second, composing round by round a hundred times more."""

    def __init__(self) -> None:
        self.counts: dict[tuple[float, float], int] = {}
        self._memo: dict[tuple, float] = {}

    @property
    def steps(self) -> int:
        return sum(self.counts.values())

    def step(self, q: float, noise_multiplier: float, count: int = 1) -> None:
        key = (float(q), float(noise_multiplier))
        self.counts[key] = self.counts.get(key, 0) + count

    def _epsilon(self, counts: dict[tuple[float, float], int], delta: float) -> float:
        key = (tuple(sorted(counts.items())), delta)
        if key not in self._memo:
            if not counts:
                self._memo[key] = 0.0
            elif any(z <= 0 for _, z in counts):
                self._memo[key] = math.inf
            else:
                try:
                    from dp_accounting import dp_event, pld
                except ImportError as exc:  # pragma: no cover - the privacy extra is installed by make
                    raise RuntimeError(
                        "privacy.accountant: pld needs the dp-accounting package (pip install 'fedmarket[privacy]'); "
                        "or set privacy.accountant: rdp"
                    ) from exc
                events = []
                for (q, z), n in sorted(counts.items()):
                    one = dp_event.GaussianDpEvent(z)
                    events.append(
                        dp_event.SelfComposedDpEvent(
                            one if q >= 1 else dp_event.PoissonSampledDpEvent(q, one), n
                        )
                    )
                acc = pld.PLDAccountant()
                acc.compose(dp_event.ComposedDpEvent(events))
                self._memo[key] = float(acc.get_epsilon(delta))
        return self._memo[key]

    def epsilon(self, delta: float) -> float:
        return self._epsilon(self.counts, delta)

    def epsilon_after(self, q: float, noise_multiplier: float, delta: float, count: int = 1) -> float:
        after = dict(self.counts)
        key = (float(q), float(noise_multiplier))
        after[key] = after.get(key, 0) + count
        return self._epsilon(after, delta)

    def state_dict(self) -> dict[str, Any]:
        return {"pld": [[q, z, n] for (q, z), n in self.counts.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {(float(q), float(z)): int(n) for q, z, n in state.get("pld", [])}


ACCOUNTANTS = {"pld": PLDAccountant, "rdp": RDPAccountant}
ACCOUNTANT_NAMES = {
    "pld": "PLD (dp-accounting's privacy-loss distributions)",
    "rdp": "RDP, sampled Gaussian (Mironov et al. 2019), conversion Balle et al. 2020",
}


def accounted_sampling(
    num_markets: int, client_fraction: float, min_markets: int, secret: bool
) -> tuple[float, str]:
    """The sampling rate ε is accounted with, and why: the rate that runs, k/n with k = max(min_markets,
    ⌈client_fraction·n⌉), when the draw is secret; 1 when every market takes part or the draw is public."""
    n = max(1, num_markets)
    k = min(n, max(min(min_markets, n), math.ceil(client_fraction * n)))
    if k >= n:
        return 1.0, f"every market takes part in every round ({n} of {n}): q = 1"
    if secret:
        return k / n, f"{k} of {n} markets a round, drawn secretly (OS randomness): q = {k}/{n} = {k / n:.4g}"
    return 1.0, (
        f"{k} of {n} markets a round, drawn from the config's public seed: no amplification by sampling is "
        "claimed, q = 1 (set privacy.secret_sampling for a secret draw)"
    )


# ------------------------------------------------------------------------------------------ clipping
def update_delta(
    upload: Mapping[str, np.ndarray], download: Mapping[str, np.ndarray], market: str
) -> Payload:
    """Δ = upload − download, key by key, in float64. A key the market did not download (its first
    upload of a phase) counts from zero. Non-float arrays cannot be privatised: rejected."""
    delta: Payload = {}
    for key, value in upload.items():
        arr = np.asarray(value)
        if arr.dtype.kind != "f":
            raise PayloadError(
                f"market {market!r}: upload {key!r} has dtype {arr.dtype}; differential privacy covers "
                "floating-point arrays only"
            )
        ref = download.get(key)
        base = np.zeros(arr.shape) if ref is None else np.asarray(ref, dtype=np.float64)
        delta[key] = arr.astype(np.float64) - base
    return delta


def global_norm(payload: Mapping[str, np.ndarray]) -> float:
    return float(math.sqrt(sum(float(np.sum(np.square(v))) for v in payload.values())))


def clip_delta(delta: Payload, clip_norm: float, clipping: str = "flat") -> tuple[Payload, float]:
    """Clip to L2 norm ≤ ``clip_norm``. Returns (clipped delta, norm before clipping).

    ``flat``: scale the whole update by min(1, C/‖Δ‖). ``per_key``: scale each key to norm ≤ C/√K (K keys),
    so ‖Δ̄‖ ≤ C still holds and the noise calibration is unchanged."""
    norm = global_norm(delta)
    if clipping == "flat":
        scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        return {k: v * scale for k, v in delta.items()}, norm
    if clipping != "per_key":
        raise ValueError(f"clipping must be 'flat' or 'per_key', got {clipping!r}")
    bound = clip_norm / math.sqrt(max(len(delta), 1))
    out = {}
    for k, v in delta.items():
        n = float(np.linalg.norm(v))
        out[k] = v * (min(1.0, bound / n) if n > 0 else 1.0)
    return out, norm


def gaussian_noise(like: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> Payload:
    """Independent N(0, std²) per coordinate, keys in sorted order so the draw is reproducible."""
    return {k: rng.standard_normal(np.shape(like[k])) * std for k in sorted(like)}


def _cast_like(values: Payload, upload: Mapping[str, np.ndarray]) -> Payload:
    return {k: np.asarray(values[k], dtype=np.asarray(upload[k]).dtype) for k in upload}


def _mean_finite(values: Sequence[float]) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


# ------------------------------------------------------------------------------------------ wrappers
@dataclass(frozen=True)
class DPSettings:
    mode: str  # "server" | "client"
    clip_norm: float
    noise_multiplier: float
    delta: float
    target_epsilon: float | None = None
    clipping: str = "flat"
    sampling_rate: float = 1.0  # the rate ε is accounted with (`accounted_sampling`)
    sampling_note: str = ""
    accountant: str = "pld"
    # per-market counts the server sums (FedMM's codebook usage): their contribution is the value itself, not
    # a delta from the download (which holds last round's sum), and they are clamped at 0 after the noise
    count_keys: tuple[str, ...] = ()

    def is_count(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in self.count_keys)

    def reference(self, download: Mapping[str, np.ndarray] | None) -> Payload:
        """What a market's update is measured from: the download, except count keys (from zero)."""
        return {k: v for k, v in (download or {}).items() if not self.is_count(k)}

    def clamp_counts(self, payload: Payload) -> Payload:
        """Project counts back to >= 0 (post-processing of a DP release keeps its guarantee)."""
        return {k: np.maximum(v, 0) if self.is_count(k) else v for k, v in payload.items()}


class PrivateClient(TrainerWrapper):
    """Wraps a market's trainer: clips its update (both modes) and adds the noise (``mode: client``).

    Records ``dp_update_norm`` (the norm before clipping) in the update's metrics, so ``rounds.csv`` shows
    how often clipping bites (choose C near the median norm)."""

    def __init__(self, inner: ClientTrainer, settings: DPSettings) -> None:
        super().__init__(inner)
        self.settings = settings

    def fit(self, payload: Payload, config: RoundConfig) -> Update:
        update = self.inner.fit(payload, config)
        if not update.payload:
            return update
        s = self.settings
        ref = s.reference(payload)
        delta = update_delta(update.payload, ref, self.market)
        clipped, norm = clip_delta(delta, s.clip_norm, s.clipping)
        if s.mode == "client":
            # a stream of its own, so the noise never correlates with training randomness
            rng = np.random.default_rng(market_seed(config.seed, f"__dp__{self.market}", config.round))
            noise = gaussian_noise(clipped, s.noise_multiplier * s.clip_norm, rng)
            clipped = {k: clipped[k] + noise[k] for k in clipped}
        released = {
            k: (np.asarray(ref[k], dtype=np.float64) if k in ref else 0.0) + clipped[k] for k in clipped
        }
        if s.mode == "client":
            released = s.clamp_counts(released)
        metrics = {**update.metrics, "dp_update_norm": norm, "dp_clipped": float(norm > s.clip_norm)}
        return Update(_cast_like(released, update.payload), update.num_examples, metrics)


class PrivateStrategy(StrategyWrapper):
    """Server side of client-level DP: adds the noise to the sum (``mode: server``), keeps the accountant,
    and stops before a round that would exceed ``target_epsilon``.

    ``secure_sum`` (optional): a function (round, {market: flat vector}) -> summed vector, so the server
    only learns Σ_k Δ̄_k (`fedmarket.federation.secagg.secure_sum`)."""

    def __init__(self, inner: Strategy, settings: DPSettings, seed: int = 0, secure_sum: Any = None) -> None:
        super().__init__(inner)
        self.settings = settings
        self.seed = seed
        self.secure_sum = secure_sum
        self.accountant = ACCOUNTANTS[settings.accountant]()
        self.participation: dict[str, int] = {}
        self.epsilons: list[dict[str, Any]] = []  # one per round: round, epsilon, markets, mean norm
        self.stopped_before: int | None = None
        self._downloads: dict[int, dict[str, Payload]] = {}

    # ---------------------------------------------------------------- accounting
    def _step_params(self) -> tuple[float, float]:
        s = self.settings
        if s.mode == "server":
            return s.sampling_rate, s.noise_multiplier
        # local DP: the market knows it is selected (q = 1); replace-one sensitivity 2C -> σ/2
        return 1.0, s.noise_multiplier / 2

    def epsilon(self) -> float:
        return self.accountant.epsilon(self.settings.delta)

    def stop_before(self, server_round: int) -> bool:
        target = self.settings.target_epsilon
        if target is None:
            return False
        q, z = self._step_params()
        nxt = self.accountant.epsilon_after(q, z, self.settings.delta)
        if nxt > target:
            self.stopped_before = server_round
            log.info(
                "privacy: stopping before round %d: ε would reach %.3f > target %.3f",
                server_round,
                nxt,
                target,
            )
            return True
        return False

    def round_metrics(self, server_round: int) -> dict[str, float]:
        """Columns added to this round's ``rounds.csv`` rows."""
        for row in reversed(self.epsilons):
            if row["round"] <= server_round:
                return {"epsilon": row["epsilon"]}
        return {"epsilon": 0.0}

    # ---------------------------------------------------------------- strategy
    def configure_train(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        downloads = self.inner.configure_train(server_round, markets)
        self._downloads = {server_round: downloads}
        return downloads

    def aggregate_train(self, server_round: int, updates: dict[str, Update]) -> None:
        s = self.settings
        uploaded = {m: u for m, u in updates.items() if u.payload}
        downloads = self._downloads.get(server_round, {})
        selected = len(downloads) or len(updates)
        norms = [u.metrics.get("dp_update_norm", float("nan")) for u in uploaded.values()]
        if s.mode == "server" and uploaded:
            updates = {**updates, **self._noisy_mean(server_round, uploaded, downloads, selected)}
        self.inner.aggregate_train(server_round, updates)
        if uploaded:  # a round in which nothing left any market spends no budget
            q, z = self._step_params()
            if s.mode == "server":
                self.accountant.step(q, z)
                eps = self.accountant.epsilon(s.delta)
            else:
                for m in uploaded:
                    self.participation[m] = self.participation.get(m, 0) + 1
                steps = max(self.participation.values())
                self.accountant = ACCOUNTANTS[s.accountant]()
                self.accountant.step(q, z, count=steps)
                eps = self.accountant.epsilon(s.delta)
        else:
            eps = self.epsilons[-1]["epsilon"] if self.epsilons else 0.0
        self.epsilons.append(
            {
                "round": server_round,
                "epsilon": eps,
                "markets": len(uploaded),
                "mean_update_norm": _mean_finite(norms),
            }
        )

    def _noisy_mean(
        self, server_round: int, uploaded: dict[str, Update], downloads: dict[str, Payload], selected: int
    ) -> dict[str, Update]:
        s = self.settings
        deltas = {m: update_delta(u.payload, s.reference(downloads.get(m)), m) for m, u in uploaded.items()}
        first = next(iter(deltas.values()))
        keys = sorted(first)
        for m, d in deltas.items():
            if sorted(d) != keys:
                raise PayloadError(f"market {m!r} uploaded keys {sorted(d)}, others {keys}")
        if self.secure_sum is not None:
            flat = {m: np.concatenate([d[k].ravel() for k in keys]) for m, d in deltas.items()}
            total_flat = self.secure_sum(server_round, flat)
            total, offset = {}, 0
            for k in keys:
                size = first[k].size
                total[k] = total_flat[offset : offset + size].reshape(first[k].shape)
                offset += size
        else:
            total = {k: sum(d[k] for d in deltas.values()) for k in keys}
        rng = np.random.default_rng(market_seed(self.seed, "__dp_server__", server_round))
        noise = gaussian_noise(total, s.noise_multiplier * s.clip_norm, rng)
        mean_delta = {k: (total[k] + noise[k]) / selected for k in keys}
        out = {}
        for m, u in uploaded.items():
            ref = s.reference(downloads.get(m))
            released = {
                k: (np.asarray(ref[k], dtype=np.float64) if k in ref else 0.0) + mean_delta[k] for k in keys
            }
            released = s.clamp_counts(released)
            # identical uploads with equal weights: the inner server step returns their common value
            out[m] = Update(_cast_like(released, u.payload), 1, u.metrics)
        return out

    def privacy_report(self) -> dict[str, Any]:
        s = self.settings
        q, z = self._step_params()
        guarantee = (
            "client-level (ε, δ)-DP of the whole run against anyone who sees the server's aggregates "
            "(add/remove one market; noise added by a trusted server)"
            if s.mode == "server"
            else "local client-level (ε, δ)-DP of each market's uploads against the server itself "
            "(replace one market's data; noise added in the market)"
        )
        report: dict[str, Any] = {
            "mode": s.mode,
            "clip_norm": s.clip_norm,
            "noise_multiplier": s.noise_multiplier,
            "clipping": s.clipping,
            "delta": s.delta,
            "sampling_rate": q,
            "sampling": s.sampling_note,
            "accounted_noise_multiplier": z,
            "target_epsilon": s.target_epsilon,
            "epsilon": self.epsilons[-1]["epsilon"] if self.epsilons else 0.0,
            "rounds": self.epsilons,
            "stopped_before_round": self.stopped_before,
            "guarantee": guarantee,
            "accountant": ACCOUNTANT_NAMES[s.accountant],
            "covers": "every round in which a market uploaded (rounds with no upload spend nothing); "
            "metrics (validation/test scores, training loss) are not covered and travel in the clear",
        }
        if self.secure_sum is not None:
            report["secure_aggregation"] = {
                "secured_rounds": [r["round"] for r in self.epsilons if r["markets"]],
                "clear_rounds": [],
                "clear_reasons": [],
                "what": "sum of clipped deltas (uniform weights); the server adds the noise to the sum",
            }
        report.update({k: v for k, v in self.inner.privacy_report().items() if k not in report})
        return report

    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "accountant": self.accountant.state_dict(),
            "participation": dict(self.participation),
            "epsilons": list(self.epsilons),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self.accountant.load_state_dict(state["accountant"])
        self.participation = dict(state["participation"])
        self.epsilons = list(state["epsilons"])


def wrap_private(
    trainers: dict[str, ClientTrainer],
    strategy: Strategy,
    settings: DPSettings,
    seed: int,
    secure_sum: Any = None,
) -> tuple[dict[str, ClientTrainer], PrivateStrategy]:
    """Wrap every market's trainer and the server strategy for client-level DP."""
    wrapped = {m: PrivateClient(t, settings) for m, t in trainers.items()}
    return wrapped, PrivateStrategy(strategy, settings, seed, secure_sum)
