"""Experiment configuration: YAML → validated dataclasses.

Unknown keys and bad values are `ConfigError`s that name the key (e.g. ``train.lr``), so a typo never
silently falls back to a default. Method-specific options live under ``method.options`` and are checked by
the method itself (`fedmarket.methods`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedmarket.errors import ConfigError, FedmarketError

MATMUL_CHOICES = ("auto", "blas", "onednn")  # train.matmul (`fedmarket.matmul`)


@dataclass
class DatasetConfig:
    name: str = "xmrec"
    markets: list[str] | None = None
    data_dir: str | None = None
    use_cache: bool = True
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    name: str = "fedavg"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    name: str = "deepfm"
    embed_dim: int = 16
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.1
    num_cross_layers: int = 2
    use_side_features: bool = True
    # CTR baselines: the market-comparable item statistics FedMM derives from a market's train data, as
    # none | buckets (each statistic's within-market quantile bucket, a categorical field) | dense (each
    # statistic z-scored within the market, a numeric field: value · v_f)
    item_features: str = "none"
    item_feature_buckets: int = 10
    # MMoE (multi-task methods): ``hidden`` = expert MLP sizes
    num_experts: int = 4
    tower_hidden: list[int] = field(default_factory=lambda: [32])
    ctcvr_mode: str = "esmm"

    def validate(self, prefix: str) -> None:
        # sasrec: the sequential methods (FeCoSR and baselines) read their model options from method.options
        if self.name not in ("deepfm", "dcnv2", "mmoe", "sasrec"):
            raise ConfigError(
                f"{prefix}.name must be one of ['dcnv2', 'deepfm', 'mmoe', 'sasrec'], got {self.name!r}"
            )
        _positive(self.num_experts, f"{prefix}.num_experts")
        if self.item_features not in ("none", "buckets", "dense"):
            raise ConfigError(
                f"{prefix}.item_features must be 'none', 'buckets' or 'dense', got {self.item_features!r}"
            )
        if self.item_feature_buckets < 2:
            raise ConfigError(f"{prefix}.item_feature_buckets must be >= 2, got {self.item_feature_buckets}")
        if any(h <= 0 for h in self.tower_hidden):
            raise ConfigError(f"{prefix}.tower_hidden must hold positive sizes, got {self.tower_hidden}")
        if self.ctcvr_mode not in ("esmm", "direct"):
            raise ConfigError(f"{prefix}.ctcvr_mode must be 'esmm' or 'direct', got {self.ctcvr_mode!r}")
        _positive(self.embed_dim, f"{prefix}.embed_dim")
        if not self.hidden or any(h <= 0 for h in self.hidden):
            raise ConfigError(
                f"{prefix}.hidden must be a non-empty list of positive sizes, got {self.hidden}"
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{prefix}.dropout must be in [0, 1), got {self.dropout}")
        if self.num_cross_layers < 0:
            raise ConfigError(f"{prefix}.num_cross_layers must be >= 0, got {self.num_cross_layers}")


@dataclass
class TrainConfig:
    rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 1024
    lr: float = 0.002
    weight_decay: float = 0.0
    negatives: int = 4
    client_fraction: float = 1.0
    min_markets: int = 1
    # the largest example count a market may report with an upload (its aggregation weight); a larger,
    # non-integer, non-finite or non-positive one fails that market's round
    max_examples: int = 1_000_000_000
    threads: int = 1  # small models and batches: a second intra-op thread costs more than it gives here
    # fp32 CPU matmul kernels (`fedmarket.matmul`): "auto" = oneDNN where it computes in fp32 (≈ 2× MKL's speed
    # on this project's AMD EPYC), else the BLAS; "blas" = PyTorch's default (every record made before
    # 2026-11-30); "onednn" = oneDNN even where it may compute in bf16 (CPUs with AMX)
    matmul: str = "auto"
    # early stopping: stop after `patience` evaluated rounds without a validation gain > min_delta (0 = off;
    # `rounds` is then the maximum). Phased methods (FedAvg + fine-tune) end a phase instead.
    patience: int = 0
    min_delta: float = 0.0
    # patience of a phased method's first phase (pre-training, transfer's source phase); None = `patience`,
    # 0 = the first phase runs all its rounds (a fixed pre-training budget, e.g. to match two methods' compute).
    # The first phase ends at its plateau or at its maximum; either way the end is recorded (phase_ends).
    phase_patience: int | None = None
    # slope guard on early stopping: with a value, running out of patience stops only when the validation
    # score's least-squares slope over the phase's last `slope_window` evaluated rounds is <= stop_slope
    # (per round, improvement positive). None = patience alone. Guards against stopping on round-to-round
    # noise while the score still rises (e.g. stop_slope 1e-4 with slope_window 20).
    stop_slope: float | None = None
    slope_window: int = 20
    # markets trained at the same time in worker processes (one `threads` each), in process only: 0 or 1 =
    # one after another. Results are bit-identical to the serial run (markets are merged in a fixed order).
    parallel_markets: int = 0
    # late join: market -> the first round it takes part in (absent: round 1). Before it, the market is not
    # trained, evaluated or tested; on joining it gets the current shared state (the strategy's `admit`). On
    # Flower a market listed here is not waited for at the start: it joins when its SuperNode connects.
    join: dict[str, int] = field(default_factory=dict)
    # leave: market -> the last round it takes part in (absent: the run's last); it keeps its best round so
    # far for the final test
    leave: dict[str, int] = field(default_factory=dict)

    def validate(self, prefix: str) -> None:
        for key in ("rounds", "local_epochs", "batch_size", "negatives", "min_markets", "threads"):
            _positive(getattr(self, key), f"{prefix}.{key}")
        _positive(self.lr, f"{prefix}.lr")
        _positive(self.max_examples, f"{prefix}.max_examples")
        if self.weight_decay < 0:
            raise ConfigError(f"{prefix}.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 < self.client_fraction <= 1:
            raise ConfigError(f"{prefix}.client_fraction must be in (0, 1], got {self.client_fraction}")
        if self.matmul not in MATMUL_CHOICES:
            raise ConfigError(f"{prefix}.matmul must be one of {list(MATMUL_CHOICES)}, got {self.matmul!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            raise ConfigError(f"{prefix}.patience must be an integer >= 0 (0 = off), got {self.patience!r}")
        pp = self.phase_patience
        if pp is not None and (isinstance(pp, bool) or not isinstance(pp, int) or pp < 0):
            raise ConfigError(
                f"{prefix}.phase_patience must be null (= patience) or an integer >= 0 "
                f"(0 = the first phase runs all its rounds), got {pp!r}"
            )
        if not isinstance(self.min_delta, (int, float)) or not 0 <= self.min_delta < 1:
            raise ConfigError(f"{prefix}.min_delta must be a number in [0, 1), got {self.min_delta!r}")
        ss = self.stop_slope
        if ss is not None and (
            isinstance(ss, bool) or not isinstance(ss, (int, float)) or not math.isfinite(ss)
        ):
            raise ConfigError(f"{prefix}.stop_slope must be null (off) or a finite number, got {ss!r}")
        pm = self.parallel_markets
        if isinstance(pm, bool) or not isinstance(pm, int) or pm < 0:
            raise ConfigError(f"{prefix}.parallel_markets must be an integer >= 0 (0 = serial), got {pm!r}")
        sw = self.slope_window
        if isinstance(sw, bool) or not isinstance(sw, int) or sw < 2:
            raise ConfigError(f"{prefix}.slope_window must be an integer >= 2, got {sw!r}")
        if ss is not None and self.patience <= 0:
            raise ConfigError(f"{prefix}.stop_slope needs early stopping on (train.patience > 0)")
        for key in ("join", "leave"):
            for market, r in getattr(self, key).items():
                if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= self.rounds:
                    raise ConfigError(
                        f"{prefix}.{key}.{market} must be a round in 1..train.rounds={self.rounds}, got {r!r}"
                    )
        for market, r in self.leave.items():
            if r < self.join.get(market, 1):
                raise ConfigError(f"{prefix}.leave.{market}={r} is before its join round {self.join[market]}")


@dataclass
class EvalConfig:
    candidates: int = 99
    split_seed: int = 2026
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    full_ranking: bool = True
    every: int = 1
    select: str = "best_valid"
    select_metric: str = "auc"
    # evaluation protocol (fedmarket.data.split): 2 = catalog of train items, cold positives reported apart;
    # 1 only to reproduce records made under it
    protocol: int = 2
    repeats: str = "collapse"  # collapse | keep (repeat-consumption data: repeated (user, item) rows stay)
    # a folder of candidate lists that came with the data (<market>.test.csv, optional <market>.valid.csv:
    # user, item, label); then those lists are scored exactly instead of sampled ones
    given_candidates: str | None = None

    def validate(self, prefix: str) -> None:
        _positive(self.candidates, f"{prefix}.candidates")
        if self.protocol not in (1, 2):
            raise ConfigError(f"{prefix}.protocol must be 1 or 2, got {self.protocol!r}")
        if self.repeats not in ("collapse", "keep"):
            raise ConfigError(f"{prefix}.repeats must be 'collapse' or 'keep', got {self.repeats!r}")
        _positive(self.every, f"{prefix}.every")
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ConfigError(f"{prefix}.ks must be a non-empty list of positive integers, got {self.ks}")
        if self.select not in ("best_valid", "last"):
            raise ConfigError(f"{prefix}.select must be 'best_valid' or 'last', got {self.select!r}")


@dataclass
class PrivacyConfig:
    """Client-level differential privacy (`fedmarket.federation.privacy`); ``mode: off`` disables it."""

    mode: str = "off"  # off | server (noise on the aggregate) | client (noise on each upload)
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    target_epsilon: float | None = None
    clipping: str = "flat"  # flat | per_key
    # keys (fnmatch) holding per-market counts that the server sums (e.g. FedMM's codebook usage): privatised as
    # absolute values (not deltas from the download) and clamped at 0 after the noise (post-processing)
    count_keys: list[str] = field(default_factory=list)
    # the accountant of the reported ε: pld (dp-accounting's privacy-loss distributions, tight) or rdp
    accountant: str = "pld"
    # draw each round's markets from OS randomness (kept secret from everyone, recorded for resume) so that
    # sampling amplifies privacy; with a seeded (public) draw ε is accounted with q = 1
    secret_sampling: bool = False

    def validate(self, prefix: str) -> None:
        if self.mode not in ("off", "server", "client"):
            raise ConfigError(f"{prefix}.mode must be 'off', 'server' or 'client', got {self.mode!r}")
        _positive(self.clip_norm, f"{prefix}.clip_norm")
        if not 0 <= self.noise_multiplier < math.inf:
            raise ConfigError(
                f"{prefix}.noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}"
            )
        if self.accountant not in ("pld", "rdp"):
            raise ConfigError(f"{prefix}.accountant must be 'pld' or 'rdp', got {self.accountant!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"{prefix}.delta must be in (0, 1), got {self.delta}")
        if self.target_epsilon is not None:
            _positive(self.target_epsilon, f"{prefix}.target_epsilon")
            if self.noise_multiplier == 0:
                raise ConfigError(f"{prefix}.target_epsilon needs {prefix}.noise_multiplier > 0")
        if self.clipping not in ("flat", "per_key"):
            raise ConfigError(f"{prefix}.clipping must be 'flat' or 'per_key', got {self.clipping!r}")


@dataclass
class SecureAggregationConfig:
    """Secure aggregation: the server sees only the sum. In process a simulation
    (`fedmarket.federation.secagg`, ``fraction_bits``); on Flower, Flower's SecAgg+ (`fedmarket.flower.secagg`,
    ``clipping_range``: every weighted value must lie in [-c, c], ``max_weight``: the largest example count a
    market may report; a market outside either fails its round loudly instead of being clipped)."""

    enabled: bool = False
    fraction_bits: int = 24
    clipping_range: float = 8.0
    max_weight: float = 100000.0

    def validate(self, prefix: str) -> None:
        if not 8 <= self.fraction_bits <= 40:
            raise ConfigError(f"{prefix}.fraction_bits must be in [8, 40], got {self.fraction_bits}")
        _positive(self.clipping_range, f"{prefix}.clipping_range")
        _positive(self.max_weight, f"{prefix}.max_weight")


@dataclass
class AttackConfig:
    """ATTACK SIMULATION (`fedmarket.federation.attacks`): poison the uploads of the listed markets."""

    markets: list[str] = field(default_factory=list)
    kind: str = "sign_flip"  # scale | sign_flip | noise
    scale: float = 10.0

    def validate(self, prefix: str) -> None:
        if self.kind not in ("scale", "sign_flip", "noise"):
            raise ConfigError(f"{prefix}.kind must be 'scale', 'sign_flip' or 'noise', got {self.kind!r}")
        _positive(self.scale, f"{prefix}.scale")
        if len(set(self.markets)) != len(self.markets):
            raise ConfigError(f"{prefix}.markets must be distinct, got {self.markets}")


@dataclass
class ExperimentConfig:
    """A whole experiment. ``seeds`` lists the training seeds; data splits depend only on eval.split_seed."""

    name: str = "experiment"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    output_dir: str = "runs"
    progress: bool = True
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    # experiment tracking (`fedmarket.tracking`): none | mlflow. How a finished run is recorded, not what it
    # computes, so merging and resuming ignore it. tracking_uri: a folder or .db file (a local SQLite store;
    # default ./mlruns) or any MLflow tracking URI; tracking_experiment: default the config name.
    tracking: str = "none"
    tracking_uri: str = "mlruns"
    tracking_experiment: str | None = None

    def validate(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError(f"name must be a non-empty string without slashes or spaces, got {self.name!r}")
        self.model.validate("model")
        self.train.validate("train")
        self.eval.validate("eval")
        self.privacy.validate("privacy")
        self.secure_aggregation.validate("secure_aggregation")
        self.attack.validate("attack")
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct, got {self.seeds}")
        self._validate_tracking()

    def _validate_tracking(self) -> None:
        """Checked before training, so that a run never ends on a tracking setting it cannot honour."""
        if self.tracking not in ("none", "mlflow"):
            raise ConfigError(f"tracking must be 'none' or 'mlflow', got {self.tracking!r}")
        if not self.tracking_uri.strip():
            raise ConfigError("tracking_uri must be a non-empty folder, file or URI")
        if self.tracking_experiment is not None and not self.tracking_experiment.strip():
            raise ConfigError("tracking_experiment must be null (= the config name) or a non-empty name")
        if self.tracking == "mlflow":
            from fedmarket.tracking import require_packages

            require_packages(self.tracking_uri)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(value: float, key: str) -> None:
    if not value > 0 or value == math.inf:  # NaN fails the comparison
        raise ConfigError(f"{key} must be a finite number > 0, got {value}")


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {type(value).__name__}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if annotation is Any:
        return value
    raise TypeError(f"unsupported annotation {annotation} for {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!r}; allowed keys: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _check_type(value, hint, key)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    cfg = _build(ExperimentConfig, data, "")
    cfg.validate()
    return cfg


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate a YAML config; ``overrides`` maps dotted keys to values (``{"train.rounds": 2}``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for dotted, value in (overrides or {}).items():
        apply_override(data, dotted, value)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_run_config(run_dir: str | Path) -> ExperimentConfig:
    """The resolved config a run folder was written with (its ``config.yaml``)."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FedmarketError(f"{run_dir} is not a run folder: {path} is missing")
    return config_from_dict(yaml.safe_load(path.read_text()))


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot override {dotted!r}: {part!r} is not a mapping")
    node[parts[-1]] = value
