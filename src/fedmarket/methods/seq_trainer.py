"""The sequential-recommendation client trainer shared by FeCoSR and its baselines.

Data (per market, tensorised once, `SeqData`): each user's train interactions ordered by time (ties keep
file order, as in `fedmarket.data.split.leave_one_out`) form one sequence; it is cut from its end into
windows of ``max_len`` next-item pairs (input s[a..b−1], targets s[a+1..b]), left-padded with 0. One epoch
= every train interaction except each user's first is a target once. Validation input = the user's train
sequence (last ``max_len`` items), target = the held-out validation item; test input = train + validation
item, target = the test item.

Training (`SeqClient`): softmax over the market's own catalog at every real (non-padded) target position,
loss CE or S²CE (`fedmarket.methods.s2ce`). Evaluation: HR/NDCG/MRR@K over the seeded 1+99 candidates and
over the full catalog minus the user's seen items (`MarketSplit.seen_for`), with the shared metrics of
`fedmarket.eval.metrics`.

Round options the trainer understands (sent by the strategy, `RoundConfig.options`):
``upload`` (default True; False: train and upload nothing), ``finetune`` (switch to local fine-tuning:
the market-specific ID embedding and bottleneck adapter start training, the backbone moves to
``backbone_lr_scale × lr``, the loss becomes ``finetune_loss``), ``active`` (list of markets that train
this round; others skip: one-to-one transfer's pre-training).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedmarket.data.split import MarketSplit, market_seed
from fedmarket.errors import ConfigError
from fedmarket.eval.metrics import candidate_ranking_metrics, full_ranking_metrics
from fedmarket.federation.core import ClientTrainer, MarketMetrics, RoundConfig, Update
from fedmarket.federation.payload import Payload, UploadDeclaration, load_payload_into, module_to_payload
from fedmarket.methods.base import ServerStepOptions
from fedmarket.methods.epochs import epoch_rng, run_epoch, seed_dropout
from fedmarket.methods.s2ce import SoftTargets, fused_s2ce_loss, s2ce_loss
from fedmarket.models.sasrec import SASRec
from fedmarket.models.text_encoder import ENCODERS, encode_texts


# ----------------------------------------------------------------------------------------- options
@dataclass
class SeqOptions(ServerStepOptions):
    """Options every sequential method shares (``method.options`` in a config).

    ``text_encoder``: "minilm" (reported results) or "hashing" (fast test double only).
    ``loss``: "ce" or "s2ce" (τ = ``tau``, λ = ``lam``, ``top_k``, ``whiten``: see `fedmarket.methods.s2ce`).
    ``federated_rounds``: rounds of federated (or source) pre-training before local fine-tuning; 0 = every
    round (no fine-tuning). ``finetune_*``: the fine-tuning stage (FeCoSR step 5). ``server_*``: the server's
    step towards the FedAvg mean in federated pre-training (`ServerStepOptions`; the defaults are plain FedAvg).
    ``loss_chunk``: rows of the catalog softmax computed at a time by the fused loss (`fused_s2ce_loss`, the
    default since 2026-11-30); 0 = the unfused reference path (``[P, N]`` logits, then ``s2ce_loss``), with
    which every earlier record was made.
    """

    text_encoder: str = "minilm"
    hidden_dim: int = 64
    num_layers: int = 2
    num_heads: int = 2
    max_len: int = 50
    dropout: float = 0.2
    adaptor: str = "moe"
    num_experts: int = 4
    loss: str = "ce"
    tau: float = 0.1
    lam: float = 0.5
    top_k: int = 0
    whiten: bool = False
    federated_rounds: int = 0
    finetune_loss: str = "ce"
    finetune_id: bool = True
    adapter_dim: int = 16
    backbone_lr_scale: float = 0.1
    eval_batch_size: int = 1024
    train_windows: str = "all"
    loss_chunk: int = 128

    def validate(self, prefix: str) -> None:
        if self.text_encoder not in ENCODERS:
            raise ConfigError(
                f"{prefix}.text_encoder must be one of {list(ENCODERS)}, got {self.text_encoder!r}"
            )
        for key in ("hidden_dim", "num_layers", "num_heads", "max_len", "num_experts", "eval_batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{prefix}.{key} must be > 0, got {getattr(self, key)}")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(f"{prefix}.hidden_dim must be divisible by num_heads")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{prefix}.dropout must be in [0, 1), got {self.dropout}")
        if self.adaptor not in ("moe", "mlp"):
            raise ConfigError(f"{prefix}.adaptor must be 'moe' or 'mlp', got {self.adaptor!r}")
        for key in ("loss", "finetune_loss"):
            if getattr(self, key) not in ("ce", "s2ce"):
                raise ConfigError(f"{prefix}.{key} must be 'ce' or 's2ce', got {getattr(self, key)!r}")
        if self.tau <= 0:
            raise ConfigError(f"{prefix}.tau must be > 0, got {self.tau}")
        if not 0 <= self.lam <= 1:
            raise ConfigError(f"{prefix}.lam must be in [0, 1], got {self.lam}")
        for key in ("top_k", "federated_rounds", "adapter_dim", "loss_chunk"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{prefix}.{key} must be >= 0, got {getattr(self, key)}")
        self.validate_server_step(prefix)
        if self.train_windows not in ("all", "last"):
            raise ConfigError(f"{prefix}.train_windows must be 'all' or 'last', got {self.train_windows!r}")
        if self.backbone_lr_scale < 0:
            raise ConfigError(f"{prefix}.backbone_lr_scale must be >= 0, got {self.backbone_lr_scale}")


# ----------------------------------------------------------------------------------------- data
def user_sequences(
    users: np.ndarray, items: np.ndarray, times: np.ndarray, num_users: int
) -> list[np.ndarray]:
    """Per user, the items ordered by (time, file order)."""
    order = np.lexsort((np.arange(len(users)), times, users))
    counts = np.bincount(users, minlength=num_users)
    return np.split(items[order], np.cumsum(counts)[:-1])


def window_pairs(
    sequences: list[np.ndarray], max_len: int, last_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Cut each sequence from its end into next-item windows; ``(inputs, targets)`` ``[S, max_len]`` with
    item + 1 and 0 padding on the left. ``last_only``: only the most recent window per user (the original
    SASRec truncation; about 3.5× cheaper per epoch on MovieLens, older history is never a target)."""
    inputs, targets = [], []
    for seq in sequences:
        n = len(seq)
        end = n
        while end > 1:
            start = max(0, end - 1 - max_len)
            inp, tgt = seq[start : end - 1] + 1, seq[start + 1 : end] + 1
            pad = max_len - len(inp)
            inputs.append(np.concatenate([np.zeros(pad, np.int64), inp]))
            targets.append(np.concatenate([np.zeros(pad, np.int64), tgt]))
            end = start + 1 if not last_only else 0
    if not inputs:
        return np.zeros((0, max_len), np.int64), np.zeros((0, max_len), np.int64)
    return np.stack(inputs), np.stack(targets)


def last_items(sequences: list[np.ndarray], max_len: int) -> np.ndarray:
    """The last ``max_len`` items of each sequence (item + 1), left-padded: ``[len(sequences), max_len]``."""
    out = np.zeros((len(sequences), max_len), np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-max_len:]
        if len(tail):
            out[row, max_len - len(tail) :] = tail + 1
    return out


@dataclass
class SeqView:
    """How one market's evaluation maps into a trainer's item space (identity, or pooled by a shared key)."""

    split: MarketSplit
    item_map: np.ndarray  # market-local item -> model item
    inputs: dict[str, torch.Tensor]  # per evaluation split: [len(eval set), L] in model item space (+1)

    @property
    def valid_inputs(self) -> torch.Tensor:
        return self.inputs["valid"]

    @property
    def test_inputs(self) -> torch.Tensor:
        return self.inputs["test"]


@dataclass
class SeqData:
    num_items: int
    train_inputs: torch.Tensor  # [S, L]
    train_targets: torch.Tensor  # [S, L]
    views: dict[str, SeqView]
    text_vectors: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_targets(self) -> int:
        return int((self.train_targets > 0).sum())

    @staticmethod
    def market_sequences(split: MarketSplit) -> list[np.ndarray]:
        m = split.market
        return user_sequences(split.train_users, split.train_items, split.train_timestamps, m.num_users)

    @classmethod
    def view_inputs(
        cls, split: MarketSplit, sequences: list[np.ndarray], item_map: np.ndarray, max_len: int
    ) -> dict[str, torch.Tensor]:
        """The input sequence of every evaluated user of each split: the train sequence for validation,
        followed by the validation item for test (whether that item is in the catalog or not)."""
        out = {}
        for name in ("valid", "test", "cold_valid", "cold_test"):
            users = split.eval_set(name).users
            seqs = [item_map[sequences[u]] for u in users]
            if name.endswith("test"):
                seqs = [np.append(s, item_map[split.valid_item[u]]) for s, u in zip(seqs, users, strict=True)]
            out[name] = torch.from_numpy(last_items(seqs, max_len))
        return out

    @classmethod
    def from_split(
        cls, split: MarketSplit, max_len: int, text_vectors: np.ndarray | None = None, last_only: bool = False
    ) -> SeqData:
        sequences = cls.market_sequences(split)
        inputs, targets = window_pairs(sequences, max_len, last_only)
        ident = np.arange(split.market.num_items)
        inputs_by_split = cls.view_inputs(split, sequences, ident, max_len)
        return cls(
            num_items=split.market.num_items,
            train_inputs=torch.from_numpy(inputs),
            train_targets=torch.from_numpy(targets),
            views={split.name: SeqView(split, ident, inputs_by_split)},
            text_vectors=text_vectors,
        )

    @classmethod
    def pooled(
        cls,
        splits: dict[str, MarketSplit],
        max_len: int,
        text: dict[str, np.ndarray] | None = None,
        last_only: bool = False,
    ) -> SeqData:
        """All markets in one item space keyed by the raw item key (title for MovieLens): NOT PRIVATE."""
        raw = np.concatenate([s.market.item_ids.astype(str) for s in splits.values()])
        codes, uniques = pd.factorize(raw)
        offsets = np.cumsum([0] + [s.market.num_items for s in splits.values()])
        item_maps = {n: codes[offsets[i] : offsets[i + 1]].astype(np.int64) for i, n in enumerate(splits)}
        vectors = None
        if text is not None:
            vectors = np.zeros((len(uniques), next(iter(text.values())).shape[1]), np.float32)
            for name in reversed(list(splits)):  # the text of the first market holding the item wins
                vectors[item_maps[name]] = text[name]
        views, all_inputs, all_targets = {}, [], []
        for name, split in splits.items():
            local = cls.market_sequences(split)
            inputs, targets = window_pairs([item_maps[name][s] for s in local], max_len, last_only)
            all_inputs.append(inputs)
            all_targets.append(targets)
            views[name] = SeqView(
                split, item_maps[name], cls.view_inputs(split, local, item_maps[name], max_len)
            )
        return cls(
            num_items=len(uniques),
            train_inputs=torch.from_numpy(np.concatenate(all_inputs)),
            train_targets=torch.from_numpy(np.concatenate(all_targets)),
            views=views,
            text_vectors=vectors,
        )


def market_text_vectors(split: MarketSplit, encoder: str) -> np.ndarray:
    text = split.market.item_text
    if text is None:
        raise ConfigError(
            f"market {split.name!r} has no item text; use an ID-only method or attach text "
            "(e.g. dataset option metadata for xmrec)"
        )
    return encode_texts(text, encoder)


# ----------------------------------------------------------------------------------------- trainer
class SeqClient(ClientTrainer):
    """Trains one SASRec on one market (or, for the pooled reference, on all markets at once)."""

    def __init__(
        self,
        name: str,
        data: SeqData,
        declaration: UploadDeclaration,
        opts: SeqOptions,
        *,
        use_text: bool = True,
        use_id: bool = False,
        lr: float = 0.001,
        weight_decay: float = 0.0,
        batch_size: int = 256,
        ks: tuple[int, ...] = (5, 10, 20),
        seed: int = 0,
    ) -> None:
        self.market = name
        self.data = data
        self.declaration = declaration
        self.opts = opts
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.ks = tuple(ks)
        self.seed = seed
        text = torch.from_numpy(data.text_vectors) if use_text else None
        # the fine-tuning module exists from the start (zero-initialised, frozen) so state dicts keep one
        # shape; an ID-only model trains its ID embedding from the start
        ft_id = use_text and opts.finetune_id
        torch.manual_seed(int(market_seed(seed, "__model__").generate_state(1)[0]))
        self.model = SASRec(
            data.num_items,
            text,
            hidden_dim=opts.hidden_dim,
            num_layers=opts.num_layers,
            num_heads=opts.num_heads,
            max_len=opts.max_len,
            dropout=opts.dropout,
            adaptor=opts.adaptor,
            num_experts=opts.num_experts,
            use_id=use_id or ft_id,
            id_init_std=0.02 if use_id else 0.0,
            adapter_dim=opts.adapter_dim,
        )
        self.always_local_id = use_id
        self.finetuning = False
        self.soft: SoftTargets | None = None
        if opts.loss == "s2ce" or opts.finetune_loss == "s2ce":
            if data.text_vectors is None:
                raise ConfigError("loss 's2ce' needs item text vectors")
            self.soft = SoftTargets.build(data.text_vectors, opts.tau, opts.top_k, opts.whiten)
        self.optimizer = self._make_optimizer()

    @property
    def markets(self) -> list[str]:
        return list(self.data.views)

    # ------------------------------------------------------------ optimisation
    def _make_optimizer(self) -> torch.optim.Optimizer:
        backbone = self.model.backbone_parameters()
        local = []
        if self.always_local_id and self.model.id_embedding is not None:
            local.append(self.model.id_embedding.weight)
        groups = [{"params": backbone + local, "lr": self.lr}]
        if self.finetuning:
            groups = [
                {"params": backbone, "lr": self.lr * self.opts.backbone_lr_scale},
                {"params": self.model.local_parameters(), "lr": self.lr},
            ]
        trainable = {id(p) for g in groups for p in g["params"]}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable)
        return torch.optim.Adam(groups, lr=self.lr, weight_decay=self.weight_decay)

    def start_finetune(self) -> None:
        """FeCoSR step 5: from here on the market-specific module trains and nothing leaves the market."""
        if not self.finetuning:
            self.finetuning = True
            self.optimizer = self._make_optimizer()

    @property
    def loss_name(self) -> str:
        return self.opts.finetune_loss if self.finetuning else self.opts.loss

    def batch_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        table = self.model.item_table()
        h = self.model.encode(inputs, table)
        mask = targets > 0  # loss only at real (non-padded) positions
        tgt = targets[mask] - 1
        soft = self.soft if self.loss_name == "s2ce" else None  # None: plain CE, exactly
        if self.opts.loss_chunk > 0:
            return fused_s2ce_loss(h[mask], table, tgt, soft, self.opts.lam, self.opts.loss_chunk)
        return s2ce_loss(h[mask] @ table.T, tgt, soft, self.opts.lam)

    def epoch_batches(self, seed: int, server_round: int, epoch: int) -> Iterator[torch.Tensor]:
        """The window indices of each batch of one epoch (permutation drawn when iterated)."""
        rng = epoch_rng(seed, self.market, server_round, epoch)
        seed_dropout(rng)  # before the permutation
        perm = torch.from_numpy(rng.permutation(len(self.data.train_inputs)))
        for s in range(0, len(perm), self.batch_size):
            yield perm[s : s + self.batch_size]

    def _window_loss(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        loss = self.batch_loss(self.data.train_inputs[idx], self.data.train_targets[idx])
        return loss, loss, len(idx)

    def train_epoch(self, seed: int, server_round: int, epoch: int) -> float:
        """One epoch of the shared loop (`fedmarket.methods.epochs.run_epoch`); the mean training loss."""
        batches = self.epoch_batches(seed, server_round, epoch)
        return run_epoch(self.model, self.optimizer, batches, self._window_loss).mean

    # ------------------------------------------------------------ federation
    def workload(self) -> int:
        """Train examples per round (`ClientTrainer.workload`)."""
        return int(self.data.num_targets)

    def initial_payload(self) -> Payload:
        return module_to_payload(self.model, self.declaration)

    def fit(self, payload: Payload, config: RoundConfig) -> Update:
        options = config.options
        active = options.get("active")
        if active is not None and self.market not in active:
            return Update({}, num_examples=0, metrics={})
        load_payload_into(self.model, payload)
        if options.get("finetune", False):
            self.start_finetune()
        losses = [self.train_epoch(config.seed, config.round, e) for e in range(config.local_epochs)]
        upload = module_to_payload(self.model, self.declaration) if options.get("upload", True) else {}
        if self.finetuning:
            upload = {}  # FeCoSR step 5: nothing leaves the market during fine-tuning, whatever is asked
        return Update(upload, num_examples=self.data.num_targets, metrics={"loss": float(np.mean(losses))})

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def states(self, inputs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        bs = self.opts.eval_batch_size
        return torch.cat(
            [self.model.last_state(inputs[s : s + bs], table) for s in range(0, len(inputs), bs)]
        )

    @torch.no_grad()
    def evaluate(self, payload: Payload | None, split: str, full_ranking: bool = False) -> MarketMetrics:
        """Ranking metrics of ``split`` per market; on ``test`` also the cold-item report (``cold_*`` keys:
        held-out positives without a train interaction, against cold and warm negatives; protocol 2)."""
        if payload:
            load_payload_into(self.model, payload)
        self.model.eval()
        table = self.model.item_table()
        results: MarketMetrics = {}
        for market, view in self.data.views.items():
            metrics = self._evaluate_set(view, table, split, full_ranking)
            if split == "test":
                cold = self._evaluate_set(view, table, "cold_test", False)
                metrics.update({f"cold_{k}": v for k, v in cold.items()})
            results[market] = metrics
        return results

    def _evaluate_set(
        self, view: SeqView, table: torch.Tensor, split: str, full_ranking: bool
    ) -> dict[str, float]:
        es = view.split.eval_set(split)
        if len(es) == 0:
            return {}
        state = self.states(view.inputs[split], table)  # [U, d]
        market_table = table[torch.from_numpy(view.item_map)]  # the market's own catalog
        scores = (state.unsqueeze(1) * market_table[torch.from_numpy(es.candidates)]).sum(-1)
        metrics = candidate_ranking_metrics(scores.numpy(), ks=self.ks)
        if full_ranking:
            users = es.users

            def score_fn(chunk: np.ndarray, state=state, market_table=market_table, users=users):
                rows = torch.from_numpy(np.searchsorted(users, chunk))
                return state[rows] @ market_table.T

            metrics.update(
                full_ranking_metrics(
                    score_fn,
                    es.users,
                    es.positives,
                    view.split.seen_for(split),
                    ks=self.ks,
                    chunk_size=2048,
                    catalog=view.split.catalog_mask,
                )
            )
        return {k: float(v) for k, v in metrics.items()}

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "finetuning": self.finetuning,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if state.get("finetuning", False) != self.finetuning:
            self.finetuning = state.get("finetuning", False)
            self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])

    def export_model(self, market: str):
        """The current SASRec, its item text vectors and ``market``'s item map, for serving
        (`fedmarket.serving.models`)."""
        from fedmarket.serving.models import seq_export

        return seq_export(self.model, self.opts, self.data, market)


def seq_client_kwargs(cfg, seed: int) -> dict[str, Any]:
    t = cfg.train
    return dict(
        lr=t.lr, weight_decay=t.weight_decay, batch_size=t.batch_size, ks=tuple(cfg.eval.ks), seed=seed
    )


def seq_clients(
    cfg,
    opts: SeqOptions,
    splits: dict[str, MarketSplit],
    seed: int,
    declaration: UploadDeclaration,
    *,
    use_text: bool = True,
    use_id: bool = False,
) -> dict[str, ClientTrainer]:
    """One `SeqClient` per market; each market encodes its own item text (nothing about it is shared)."""
    clients: dict[str, ClientTrainer] = {}
    for name, split in splits.items():
        text = market_text_vectors(split, opts.text_encoder) if use_text else None
        data = SeqData.from_split(split, opts.max_len, text, opts.train_windows == "last")
        clients[name] = SeqClient(
            name, data, declaration, opts, use_text=use_text, use_id=use_id, **seq_client_kwargs(cfg, seed)
        )
    return clients
