"""Sequential-recommendation baselines around FeCoSR (METHODS.md, FeCoSR step 6).

What leaves a market (the one place this is declared for these methods):
- ``seq_local_text`` / ``seq_local_id``: nothing (SASRec on text-based / ID item representations).
- ``seq_local_text_ft``: nothing. Local text-SASRec, then FeCoSR's fine-tuning stage (local ID embedding +
  adapter) on the market's own model: FeCoSR's schedule and market module with nothing federated, the control
  that separates what collaboration gives FeCoSR from what its two stages give.
- ``seq_fedavg``: FedAvg-CE over the text adaptor + Transformer (``federated_rounds`` > 0 adds local
  fine-tuning, during which nothing leaves).
- ``seq_transfer``: one-to-one transfer. The source market (largest by train interactions, or
  ``source_market``) uploads its adaptor + Transformer while it pre-trains alone; every other market
  downloads it once and fine-tunes. Results include the source market, which gains nothing from it.
- ID-only rows, for markets without item text (XMarket): ``seq_fedavg_id`` and ``seq_transfer_id`` share the
  Transformer and position embeddings (``position.*``, ``blocks.*``, ``final_norm.*``); ID embeddings stay
  local (IDs are disjoint across markets).
- ``seq_central_shared_ids``: NOT PRIVATE. All markets pooled into one model, items keyed by their raw key
  (the title for MovieLens), text + ID representations: the ceiling of cross-market signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmarket.errors import ConfigError, FedmarketError
from fedmarket.federation.core import Strategy, Update
from fedmarket.federation.payload import Payload, UploadDeclaration
from fedmarket.federation.strategies import FederatedPhase, NoFederation
from fedmarket.methods.base import Method, register
from fedmarket.methods.fecosr import TEXT_BACKBONE_UPLOAD, federated_then_local
from fedmarket.methods.seq_trainer import (
    SeqClient,
    SeqData,
    SeqOptions,
    market_text_vectors,
    seq_client_kwargs,
    seq_clients,
)

SEQ_LOCAL_UPLOAD = UploadDeclaration((), "nothing leaves a market")
ID_BACKBONE_UPLOAD = UploadDeclaration(
    ("position.*", "blocks.*", "final_norm.*"), "Transformer weights only; ID embeddings stay local"
)
SEQ_POOLED_UPLOAD = UploadDeclaration(
    (), "not private: raw train sequences are pooled, items keyed by title; no parameters are exchanged"
)


class LocalThenFinetune(FederatedPhase, NoFederation):
    """Each market trains alone for rounds 1..F (F = ``federated_rounds``; with ``train.patience`` the first
    stage ends at its validation plateau, F is then the maximum), then switches to fine-tuning with its
    market-specific module: FeCoSR's two stages with nothing sent or received in any round."""

    def __init__(self, local_rounds: int) -> None:
        self.federated_rounds = local_rounds

    def round_options(self, server_round: int) -> dict[str, Any]:
        return {"upload": False, "finetune": server_round > self.federated_rounds}


class OneToOneTransfer(FederatedPhase, Strategy):
    """Pre-train on one source market for ``source_rounds`` rounds (only it trains; it uploads its shared
    weights so the targets can be evaluated zero-shot), then every other market downloads the source
    model once and all markets fine-tune locally, uploading nothing. With ``train.patience`` the source
    phase ends at the source market's validation plateau (``source_rounds`` is then the maximum), like a
    federated phase."""

    def __init__(self, source: str | None, source_rounds: int) -> None:
        self.source = source
        self.federated_rounds = source_rounds
        self.source_payload: Payload = {}
        self.newcomers: list[str] = []  # joined late, not yet trained from the source model

    def admit(self, market: str, server_round: int) -> None:
        """A newcomer after the source phase downloads the source model with its first training round."""
        if market not in self.newcomers and market != self.source:
            self.newcomers.append(market)

    @property
    def source_rounds(self) -> int:
        return self.federated_rounds

    def _check(self) -> str:
        if self.source is None:
            raise FedmarketError(
                "one-to-one transfer needs method.options.source_market when built without data"
            )
        return self.source

    def initialize(self, initial: Payload) -> None:
        self._check()
        self.source_payload = {k: np.array(v, copy=True) for k, v in initial.items()}

    def configure_train(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        source = self._check()
        if server_round == self.source_rounds + 1:
            return {m: ({} if m == source else self.source_payload) for m in markets}
        late = server_round > self.source_rounds + 1
        return {m: (self.source_payload if late and m in self.newcomers else {}) for m in markets}

    def configure_evaluate(self, server_round: int, markets: list[str]) -> dict[str, Payload]:
        source = self._check()
        if server_round <= self.source_rounds:  # targets: the source model zero-shot
            return {m: ({} if m == source else self.source_payload) for m in markets}
        return {m: {} for m in markets}

    def aggregate_train(self, server_round: int, updates: dict[str, Update]) -> None:
        source = self._check()
        if server_round > self.source_rounds:
            self.newcomers = [m for m in self.newcomers if m not in updates]
        if server_round <= self.source_rounds and source in updates and updates[source].payload:
            self.source_payload = dict(updates[source].payload)

    def round_options(self, server_round: int) -> dict[str, Any]:
        if server_round <= self.source_rounds:
            return {"active": [self._check()], "upload": True}
        return {"finetune": True, "upload": False}

    def state_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "source_payload": self.source_payload,
            "newcomers": list(self.newcomers),
            **self.phase_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source = state["source"]
        self.source_payload = dict(state["source_payload"])
        self.newcomers = list(state.get("newcomers", []))
        self.load_phase_state(state)

    def plateau_markets(self, server_round: int) -> list[str] | None:
        """The source phase converges on the source market's own validation score (the targets only score
        the source model zero-shot, with untrained ID embeddings in the ID-only row); afterwards, all markets."""
        return [self._check()] if server_round <= self.source_rounds else None


@dataclass
class TransferOptions(SeqOptions):
    source_market: str = ""
    source_rounds: int = 10

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.source_rounds < 1:
            raise ConfigError(f"{prefix}.source_rounds must be >= 1, got {self.source_rounds}")


def largest_market(splits) -> str | None:
    if not splits:
        return None
    return max(splits, key=lambda n: len(splits[n].train_index))


def build_local_text(cfg, opts, splits, seed):
    return seq_clients(cfg, opts, splits, seed, SEQ_LOCAL_UPLOAD, use_text=True), NoFederation()


@dataclass
class LocalFinetuneOptions(SeqOptions):
    federated_rounds: int = 10  # here: rounds of the first (local text-SASRec) stage, at most

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        if self.federated_rounds < 1:
            raise ConfigError(
                f"{prefix}.federated_rounds (rounds before the fine-tuning stage) must be >= 1 for "
                f"seq_local_text_ft, got {self.federated_rounds}"
            )


def build_local_text_ft(cfg, opts, splits, seed):
    clients = seq_clients(cfg, opts, splits, seed, SEQ_LOCAL_UPLOAD, use_text=True)
    return clients, LocalThenFinetune(opts.federated_rounds)


def build_local_id(cfg, opts, splits, seed):
    return seq_clients(cfg, opts, splits, seed, SEQ_LOCAL_UPLOAD, use_text=False, use_id=True), NoFederation()


def build_fedavg(cfg, opts, splits, seed):
    clients = seq_clients(cfg, opts, splits, seed, TEXT_BACKBONE_UPLOAD, use_text=True)
    return clients, federated_then_local(opts)


def build_fedavg_id(cfg, opts, splits, seed):
    clients = seq_clients(cfg, opts, splits, seed, ID_BACKBONE_UPLOAD, use_text=False, use_id=True)
    return clients, federated_then_local(opts)


def _transfer(cfg, opts, splits, seed, declaration, use_text):
    source = opts.source_market or largest_market(splits)
    # a Flower client builds with its own market only: the source is then another node's market
    if len(splits) > 1 and source not in splits:
        raise ConfigError(f"method.options.source_market {source!r} is not one of the markets {list(splits)}")
    clients = seq_clients(cfg, opts, splits, seed, declaration, use_text=use_text, use_id=not use_text)
    return clients, OneToOneTransfer(source, opts.source_rounds)


def build_transfer(cfg, opts, splits, seed):
    return _transfer(cfg, opts, splits, seed, TEXT_BACKBONE_UPLOAD, use_text=True)


def build_transfer_id(cfg, opts, splits, seed):
    return _transfer(cfg, opts, splits, seed, ID_BACKBONE_UPLOAD, use_text=False)


def build_central_shared(cfg, opts, splits, seed):
    if not splits:
        return {}, NoFederation()
    text = {n: market_text_vectors(s, opts.text_encoder) for n, s in splits.items()}
    data = SeqData.pooled(splits, opts.max_len, text, opts.train_windows == "last")
    client = SeqClient(
        "pooled", data, SEQ_POOLED_UPLOAD, opts, use_text=True, use_id=True, **seq_client_kwargs(cfg, seed)
    )
    return {"pooled": client}, NoFederation()


def _register(name, declaration, build, options=SeqOptions, private=True, summary=""):
    register(Method(name, declaration, build, options, private=private, task="seq", summary=summary))


_register(
    "seq_local_text", SEQ_LOCAL_UPLOAD, build_local_text, summary="Local text-SASRec (MiniLM + adaptor)"
)
_register(
    "seq_local_text_ft",
    SEQ_LOCAL_UPLOAD,
    build_local_text_ft,
    LocalFinetuneOptions,
    summary="Local text-SASRec, then local fine-tuning with the market module: FeCoSR with nothing federated",
)
_register("seq_local_id", SEQ_LOCAL_UPLOAD, build_local_id, summary="Local SASRec on item IDs")
_register(
    "seq_fedavg",
    TEXT_BACKBONE_UPLOAD,
    build_fedavg,
    summary="FedAvg over text adaptor + Transformer (loss option; federated_rounds > 0 adds local fine-tune)",
)
_register(
    "seq_fedavg_id",
    ID_BACKBONE_UPLOAD,
    build_fedavg_id,
    summary="FedAvg of Transformer weights, local ID embeddings (no shared semantics)",
)
_register(
    "seq_transfer",
    TEXT_BACKBONE_UPLOAD,
    build_transfer,
    TransferOptions,
    summary="one-to-one transfer: text-SASRec pre-trained on the source market, fine-tuned on every other",
)
_register(
    "seq_transfer_id",
    ID_BACKBONE_UPLOAD,
    build_transfer_id,
    TransferOptions,
    summary="one-to-one transfer of the Transformer (ID-only), fine-tuned with local ID embeddings",
)
_register(
    "seq_central_shared_ids",
    SEQ_POOLED_UPLOAD,
    build_central_shared,
    private=False,
    summary="NOT PRIVATE: all markets pooled, items keyed by title (text + ID)",
)
