"""Multi-task (CTR + CTCVR) baselines for PF-MSMTrec (METHODS.md, step 7), all on the same MMoE
(``model.num_experts`` shared experts, one gate and one tower per task, `fedmarket.models.mmoe`).

What leaves a scenario (the one place this is declared for these methods):

- ``mtl_local``: nothing.
- ``mtl_fedavg`` / ``mtl_fedavg_ft`` / ``mtl_fedprox`` / ``mtl_ditto``: every parameter except the
  embeddings of scenario-local IDs (``embedding.id_*``): public-vocabulary feature embeddings, experts
  (BatchNorm affine parameters and running statistics included, as in plain FedAvg), gates and towers.
- ``mtl_fedbn`` (Li et al., ICLR 2021): as FedAvg, but BatchNorm layers stay local.
- ``mtl_fedper`` (Arivazhagan et al. 2019): as FedAvg, but the task towers stay local.
- ``mtl_centralized``: NOT PRIVATE. Every scenario's raw impressions pooled into one MMoE, scenario as a
  feature, scenario-prefixed IDs.

Variants: FedAvg + local fine-tune runs ``federated_rounds`` of FedAvg and then trains each scenario alone
from the final global model for the remaining rounds (uploading nothing); FedProx adds (μ/2)‖θ − θ_global‖²;
Ditto (Li et al., ICML 2021) trains the FedAvg model plus a personal one tied to it with (λ/2)‖v − θ‖².
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedmarket.errors import ConfigError
from fedmarket.federation.core import ClientTrainer
from fedmarket.federation.payload import UploadDeclaration
from fedmarket.federation.strategies import FedAvg, FedAvgThenLocal, NoFederation
from fedmarket.methods.base import FedAvgOptions, FedProxOptions, Method, NoOptions, register
from fedmarket.methods.mtl_trainer import MTLClient, MTLData

MTL_LOCAL_UPLOAD = UploadDeclaration((), "nothing leaves a scenario")
MTL_FEDAVG_UPLOAD = UploadDeclaration(
    ("embedding.feat_*", "experts_*", "gates.*", "towers.*"),
    "every parameter except the embeddings of scenario-local IDs",
)
MTL_FEDBN_UPLOAD = UploadDeclaration(
    ("embedding.feat_*", "experts_*.linear*", "gates.*", "towers.*"),
    "as FedAvg, but BatchNorm parameters and statistics stay local",
)
MTL_FEDPER_UPLOAD = UploadDeclaration(
    ("embedding.feat_*", "experts_*", "gates.*"), "as FedAvg, but the task towers stay local"
)
MTL_POOLED_UPLOAD = UploadDeclaration(
    (), "not private: raw impressions are pooled, no parameters are exchanged"
)


def mmoe_options(cfg, **template: int) -> dict[str, Any]:
    """MMoE constructor arguments from ``cfg.model``; ``template`` overrides the expert groups (default: all
    ``num_experts`` shared, as in plain MMoE)."""
    m = cfg.model
    options = dict(
        embed_dim=m.embed_dim,
        num_shared_experts=m.num_experts,
        num_task_experts=0,
        num_scenario_experts=0,
        expert_hidden=tuple(m.hidden),
        tower_hidden=tuple(m.tower_hidden),
        dropout=m.dropout,
        ctcvr_mode=m.ctcvr_mode,
    )
    options.update(template)
    return options


def mtl_clients(
    cfg, splits, seed: int, upload: UploadDeclaration, model_options: dict[str, Any] | None = None
) -> dict[str, ClientTrainer]:
    t = cfg.train
    return {
        name: MTLClient(
            name,
            MTLData.from_split(split),
            upload,
            model_options=model_options or mmoe_options(cfg),
            lr=t.lr,
            weight_decay=t.weight_decay,
            batch_size=t.batch_size,
            seed=seed,
        )
        for name, split in splits.items()
    }


@dataclass
class FineTuneOptions(FedAvgOptions):
    federated_rounds: int = 10

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.federated_rounds < 1:
            raise ConfigError(f"{prefix}.federated_rounds must be >= 1, got {self.federated_rounds}")


@dataclass
class DittoOptions(FedAvgOptions):
    lam: float = 0.1

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.lam <= 0:
            raise ConfigError(f"{prefix}.lam must be > 0, got {self.lam}")


def build_local(cfg, opts, splits, seed):
    return mtl_clients(cfg, splits, seed, MTL_LOCAL_UPLOAD), NoFederation()


def build_fedavg(cfg, opts, splits, seed):
    return mtl_clients(cfg, splits, seed, MTL_FEDAVG_UPLOAD), FedAvg(**opts.fedavg_kwargs())


def build_fedavg_ft(cfg, opts, splits, seed):
    strategy = FedAvgThenLocal(opts.federated_rounds, **opts.fedavg_kwargs())
    return mtl_clients(cfg, splits, seed, MTL_FEDAVG_UPLOAD), strategy


def build_fedprox(cfg, opts, splits, seed):
    strategy = FedAvg(**opts.fedavg_kwargs(), options={"proximal_mu": opts.mu})
    return mtl_clients(cfg, splits, seed, MTL_FEDAVG_UPLOAD), strategy


def build_fedbn(cfg, opts, splits, seed):
    return mtl_clients(cfg, splits, seed, MTL_FEDBN_UPLOAD), FedAvg(**opts.fedavg_kwargs())


def build_fedper(cfg, opts, splits, seed):
    return mtl_clients(cfg, splits, seed, MTL_FEDPER_UPLOAD), FedAvg(**opts.fedavg_kwargs())


def build_ditto(cfg, opts, splits, seed):
    strategy = FedAvg(**opts.fedavg_kwargs(), options={"ditto_lambda": opts.lam})
    return mtl_clients(cfg, splits, seed, MTL_FEDAVG_UPLOAD), strategy


def build_centralized(cfg, opts, splits, seed):
    t = cfg.train
    client = MTLClient(
        "pooled",
        MTLData.pooled(splits),
        MTL_POOLED_UPLOAD,
        model_options=mmoe_options(cfg),
        lr=t.lr,
        weight_decay=t.weight_decay,
        batch_size=t.batch_size,
        seed=seed,
    )
    return {"pooled": client}, NoFederation()


for _name, _decl, _build, _opts, _summary in (
    ("mtl_local", MTL_LOCAL_UPLOAD, build_local, NoOptions, "Local MMoE per scenario, no federation"),
    ("mtl_fedavg", MTL_FEDAVG_UPLOAD, build_fedavg, FedAvgOptions, "FedAvg-MMoE (all but ID embeddings)"),
    (
        "mtl_fedavg_ft",
        MTL_FEDAVG_UPLOAD,
        build_fedavg_ft,
        FineTuneOptions,
        "FedAvg-MMoE, then local fine-tuning from the final global model",
    ),
    ("mtl_fedprox", MTL_FEDAVG_UPLOAD, build_fedprox, FedProxOptions, "FedProx-MMoE (proximal term μ)"),
    ("mtl_fedbn", MTL_FEDBN_UPLOAD, build_fedbn, FedAvgOptions, "FedBN-MMoE: BatchNorm stays local"),
    ("mtl_fedper", MTL_FEDPER_UPLOAD, build_fedper, FedAvgOptions, "FedPer-MMoE: task towers stay local"),
    ("mtl_ditto", MTL_FEDAVG_UPLOAD, build_ditto, DittoOptions, "Ditto-MMoE: personal model tied by λ"),
):
    register(Method(_name, _decl, _build, _opts, task="mtl", summary=_summary))
register(
    Method(
        "mtl_centralized",
        MTL_POOLED_UPLOAD,
        build_centralized,
        NoOptions,
        private=False,
        task="mtl",
        summary="NOT PRIVATE: pooled multi-scenario MMoE, scenario as a feature",
    )
)
