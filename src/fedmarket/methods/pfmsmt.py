"""PF-MSMTrec: personalised federated multi-scenario multi-task recommendation ("Towards Personalized
Federated Multi-Scenario Multi-Task Recommendation", arXiv 2406.18938, WSDM 2025). Only the abstract is
public; this is the reconstruction of METHODS.md ("PF-MSMTrec"), every module switchable by an option.

What stays in a scenario: the embeddings of scenario-local IDs (``embedding.id_*``), the gates, the
scenario-specific experts, and (FedBN) every BatchNorm layer. BatchNorm running statistics never leave,
even with ``fedbn: false`` (that ablation shares the BatchNorm affine parameters only): they are summaries
of a scenario's raw inputs.

What is shared (the declaration below is the union over all options): public-vocabulary feature embeddings,
the shared experts and the task-specific experts (their linear layers), and the task towers.

Client step (step 6): L_k = BCE(CTR) + BCE(CTCVR) + (μ/2)‖θ_k − θ̄_k‖² over the aggregated parameters,
starting from the personalised download θ̄_k (`fedmarket.methods.mtl_trainer.MTLClient`).

Server step, per module (each shared expert, each task-specific expert, each feature embedding) and then,
separately, per task tower (steps 4-5, `fedmarket.federation.personalized.personalized_aggregate`):
  Δ_k = upload_k − download_k;  Δ'_k = PCGrad(Δ_k | {Δ_j})          (conflict coordination)
  θ_j = download_j + Δ'_j;       θ̄_k = Σ_j softmax_j(cos(Δ_k, Δ_j)/τ) θ_j   (personalised aggregation)
and ``configure_train`` returns each scenario its own θ̄_k.

Ablations (method options): ``template: false`` (no task-/scenario-specific experts: all experts shared),
``fedbn: false``, ``conflict: false``, ``personalize: false`` (everyone gets the example-weighted mean of
the coordinated models), ``towers: false`` (towers stay local: no tower aggregation).

Variant (not part of the paper's method): ``federated_rounds: N`` (> 0) adds a local fine-tuning stage, as in
"FedAvg + local fine-tune": personalised federation for at most N rounds (with ``train.patience``, until its
validation plateau), then every scenario downloads its personalised model once and trains alone with plain
BCE, uploading nothing. 0 (default): federate every round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmarket.data.split import market_seed
from fedmarket.errors import ConfigError
from fedmarket.federation.core import Strategy, Update
from fedmarket.federation.payload import Payload, UploadDeclaration
from fedmarket.federation.personalized import personalized_aggregate
from fedmarket.federation.strategies import FederatedPhase, ServerStep
from fedmarket.methods.base import Method, ServerStepOptions, register
from fedmarket.methods.mtl_baselines import mmoe_options, mtl_clients

_BN_AFFINE = (
    "experts_shared.*.bn*.weight",
    "experts_shared.*.bn*.bias",
    "experts_task.*.bn*.weight",
    "experts_task.*.bn*.bias",
)
PFMSMT_UPLOAD = UploadDeclaration(
    ("embedding.feat_*", "experts_shared.*.linear*", "experts_task.*.linear*", *_BN_AFFINE, "towers.*"),
    "shared and task-specific experts, task towers, public-vocabulary embeddings; never BatchNorm "
    "statistics, scenario-specific experts, gates or ID embeddings",
)


def client_upload(opts: PFMSMTOptions) -> UploadDeclaration:
    """The part of `PFMSMT_UPLOAD` a client sends under ``opts``."""
    patterns = ["embedding.feat_*", "experts_shared.*.linear*", "experts_task.*.linear*"]
    if not opts.fedbn:
        patterns += list(_BN_AFFINE)
    if opts.towers:
        patterns.append("towers.*")
    return UploadDeclaration(tuple(patterns), PFMSMT_UPLOAD.reason)


def module_of(key: str) -> str:
    """The module a parameter belongs to, the unit of coordination and personalisation:
    ``experts_task.ctr.0.linear0.weight`` → ``experts_task.ctr.0``; ``towers.cvr.out.bias`` → ``towers.cvr``;
    ``embedding.feat_genre.weight`` → ``embedding.feat_genre``."""
    parts = key.split(".")
    return ".".join(parts[:3] if parts[0] == "experts_task" else parts[:2])


@dataclass
class PFMSMTOptions(ServerStepOptions):
    template: bool = True
    fedbn: bool = True
    conflict: bool = True
    personalize: bool = True
    towers: bool = True
    tau: float = 1.0
    mu: float = 0.01
    num_task_experts: int = 1
    num_scenario_experts: int = 1
    size_weighted: bool = False
    federated_rounds: int = 0

    def validate(self, prefix: str) -> None:
        self.validate_server_step(prefix)
        if self.federated_rounds < 0:
            raise ConfigError(
                f"{prefix}.federated_rounds must be >= 0 (0: no local fine-tuning stage), got {self.federated_rounds}"
            )
        if self.tau <= 0:
            raise ConfigError(f"{prefix}.tau must be > 0, got {self.tau}")
        if self.mu < 0:
            raise ConfigError(f"{prefix}.mu must be >= 0, got {self.mu}")
        if self.num_task_experts < 0 or self.num_scenario_experts < 0:
            raise ConfigError(f"{prefix}.num_task_experts and num_scenario_experts must be >= 0")


class PersonalizedStrategy(FederatedPhase, Strategy):
    """Server of PF-MSMTrec: one personalised download per scenario (module docstring). With
    ``federated_rounds`` > 0, rounds after it are local fine-tuning: round ``federated_rounds + 1`` sends each
    scenario its personalised model once, later rounds send nothing, and no round after it uploads."""

    def __init__(
        self,
        *,
        tau: float = 1.0,
        coordinate: bool = True,
        personalize: bool = True,
        mu: float = 0.0,
        size_weighted: bool = False,
        seed: int = 0,
        federated_rounds: int = 0,
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        server_optimizer: str = "sgd",
        server_beta2: float = 0.99,
        server_tau: float = 1e-3,
    ) -> None:
        self.federated_rounds = federated_rounds
        self.tau, self.coordinate, self.personalize = tau, coordinate, personalize
        self.mu, self.size_weighted, self.seed = mu, size_weighted, seed
        # the step from each scenario's last download towards its personalised aggregate (the defaults: the
        # aggregate itself, the paper's method); its state per scenario
        self.server = ServerStep(server_optimizer, server_lr, server_momentum, server_beta2, server_tau)
        self.initial: Payload = {}
        self.personal: dict[str, Payload] = {}
        self.velocity: dict[str, Payload] = {}
        self.newcomers: list[str] = []  # joined late, not yet trained with their first download

    def initialize(self, initial: Payload) -> None:
        self.initial = {k: np.array(v, copy=True) for k, v in initial.items()}
        self.personal = {}
        self.velocity = {}
        self.newcomers = []

    def download(self, market: str) -> Payload:
        return self.personal.get(market, self.initial)

    def admit(self, market: str, server_round: int) -> None:
        """A newcomer starts from the template with a fresh personalised row: the plain mean of the
        markets' current personalised models (no similarity to anyone yet), sent with its first training
        round even in the fine-tuning phase; its own aggregation row forms from its first upload on."""
        if market in self.personal or not self.personal:
            return  # nothing aggregated yet: the initial template, as for everyone
        models = list(self.personal.values())
        self.personal[market] = {
            k: (np.mean([np.asarray(p[k], np.float64) for p in models], axis=0).astype(np.asarray(v).dtype))
            for k, v in models[0].items()
        }
        self.newcomers.append(market)

    def federating(self, server_round: int) -> bool:
        return self.federated_rounds == 0 or server_round <= self.federated_rounds

    def configure_train(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        if self.federating(server_round - 1):
            return {m: self.download(m) for m in markets}
        return {m: (self.download(m) if m in self.newcomers else {}) for m in markets}

    def aggregate_train(self, server_round: int, updates: dict[str, Update]) -> None:
        self.newcomers = [m for m in self.newcomers if m not in updates]
        if not self.federating(server_round):
            return
        markets = [m for m, u in updates.items() if u.payload]
        if not markets:
            return
        rng = np.random.default_rng(market_seed(self.seed, "__pfmsmt__", server_round))
        merged = personalized_aggregate(
            [self.download(m) for m in markets],
            [updates[m].payload for m in markets],
            module_of,
            tau=self.tau,
            coordinate=self.coordinate,
            personalize=self.personalize,
            sizes=[updates[m].num_examples for m in markets],
            size_weighted=self.size_weighted,
            rng=rng,
        )
        for m, payload in zip(markets, merged, strict=True):
            self.personal[m], self.velocity[m] = self.server.apply(
                self.download(m), payload, self.velocity.get(m)
            )

    def round_options(self, server_round: int) -> dict[str, Any]:
        if self.federating(server_round):
            return {"proximal_mu": self.mu}
        return {"proximal_mu": 0.0, "upload": False}

    def state_dict(self) -> dict[str, Any]:
        return {
            "initial": self.initial,
            "personal": self.personal,
            "server_velocity": self.velocity,
            "newcomers": list(self.newcomers),
            **self.phase_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_phase_state(state)
        self.initial = dict(state["initial"])
        self.personal = {m: dict(p) for m, p in state["personal"].items()}
        # absent in checkpoints written before server momentum
        self.velocity = {m: dict(v) for m, v in state.get("server_velocity", {}).items()}
        self.newcomers = list(state.get("newcomers", []))


def build_pfmsmt(cfg, opts: PFMSMTOptions, splits, seed):
    total = cfg.model.num_experts
    if opts.template:
        shared = total - opts.num_task_experts - opts.num_scenario_experts
        if shared < 0:
            raise ConfigError(
                f"model.num_experts={total} is fewer than num_task_experts + num_scenario_experts "
                f"({opts.num_task_experts} + {opts.num_scenario_experts})"
            )
        template = dict(
            num_shared_experts=shared,
            num_task_experts=opts.num_task_experts,
            num_scenario_experts=opts.num_scenario_experts,
        )
    else:
        template = dict(num_shared_experts=total, num_task_experts=0, num_scenario_experts=0)
    clients = mtl_clients(cfg, splits, seed, client_upload(opts), mmoe_options(cfg, **template))
    strategy = PersonalizedStrategy(
        tau=opts.tau,
        coordinate=opts.conflict,
        personalize=opts.personalize,
        mu=opts.mu,
        size_weighted=opts.size_weighted,
        seed=seed,
        federated_rounds=opts.federated_rounds,
        **opts.server_step_kwargs(),
    )
    return clients, strategy


register(
    Method(
        "pfmsmt",
        PFMSMT_UPLOAD,
        build_pfmsmt,
        PFMSMTOptions,
        task="mtl",
        summary="PF-MSMTrec: template + FedBN + conflict coordination + personalised aggregation",
        declare=lambda cfg, opts: client_upload(opts),
    )
)
