"""CTR baselines: Local, FedAvg, FedProx, FedPer, Centralized (market-prefixed IDs) and
Central-shared-IDs.

What leaves a market (the one place this is declared for these methods):
- Local: nothing.
- FedAvg / FedProx: the dense layers (``dnn.*``, ``cross.*``, ``head.*``, ``bias``). ID embeddings and
  side-feature tables stay local: IDs are disjoint across markets, so averaging them would mix unrelated items.
  With ``model.item_features: buckets`` also the tables of the item-statistic buckets (``stat_*``): a bucket
  is a within-market quantile of a market-comparable statistic, so it means the same in every market (as
  FedMM's level-1 code table, which FedMM federates the same way). With ``model.item_features: dense`` the
  one-row tables of the numeric statistic fields (``num_stat_*``) instead, for the same reason.
- FedPer (Arivazhagan et al. 2019): the dense body (``dnn.*``, ``cross.*``) and the statistic tables; the
  head stays local.
- Centralized / Central-shared-IDs: NOT PRIVATE. Raw interactions are pooled into one model, either with
  market-prefixed IDs (no cross-market identity) or keyed by the real shared item key (e.g. ASIN), the
  ceiling of the cross-market signal in the data. Their "upload" is the raw train interactions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fedmarket.data.split import MarketSplit, SeenItems
from fedmarket.errors import ConfigError
from fedmarket.federation.core import ClientTrainer
from fedmarket.federation.payload import UploadDeclaration
from fedmarket.federation.strategies import FedAvg, NoFederation
from fedmarket.methods.base import FedAvgOptions, FedProxOptions, Method, NoOptions, register
from fedmarket.methods.ctr_trainer import CTRClient, CTRData, MarketView
from fedmarket.methods.item_stats import item_stat_buckets, item_stat_dense

LOCAL_UPLOAD = UploadDeclaration((), "nothing leaves a market")
BUCKET_TABLES = ("features.embedding.stat_*", "features.linear.stat_*")
NUMERIC_TABLES = ("features.embedding.num_stat_*", "features.linear.num_stat_*")
STAT_TABLES = (*BUCKET_TABLES, *NUMERIC_TABLES)
DENSE_UPLOAD = UploadDeclaration(
    ("dnn.*", "cross.*", "head.*", "bias", *STAT_TABLES),
    "dense layers (and item-statistic bucket tables with model.item_features) only; ID embeddings stay local",
)
FEDPER_UPLOAD = UploadDeclaration(
    ("dnn.*", "cross.*", *STAT_TABLES),
    "dense body (and item-statistic bucket tables) only; the head and ID embeddings stay local",
)
POOLED_UPLOAD = UploadDeclaration(
    (), "not private: raw train interactions are pooled, no parameters are exchanged"
)


def ctr_client_kwargs(cfg, seed: int) -> dict:
    m, t = cfg.model, cfg.train
    model_options = {"embed_dim": m.embed_dim, "hidden": tuple(m.hidden), "dropout": m.dropout}
    if m.name == "dcnv2":
        model_options["num_cross_layers"] = m.num_cross_layers
    return dict(
        model=m.name,
        model_options=model_options,
        lr=t.lr,
        weight_decay=t.weight_decay,
        batch_size=t.batch_size,
        negatives=t.negatives,
        ks=tuple(cfg.eval.ks),
        seed=seed,
        progress=cfg.progress,
    )


def in_force(declaration: UploadDeclaration):
    """``Method.declare`` of the dense-layer methods: the item-statistic bucket tables are in force only with
    ``model.item_features`` set, the cross network only with ``model.name: dcnv2``."""

    def declare(cfg, opts) -> UploadDeclaration:
        keep = {"buckets": BUCKET_TABLES, "dense": NUMERIC_TABLES}.get(cfg.model.item_features, ())
        cross = cfg.model.name == "dcnv2"  # the cross network exists in DCNv2 only
        return UploadDeclaration(
            tuple(
                p
                for p in declaration.patterns
                if (p not in STAT_TABLES or p in keep) and (p != "cross.*" or cross)
            ),
            declaration.reason,
        )

    return declare


def item_feature_fields(cfg, split: MarketSplit) -> dict[str, tuple[np.ndarray, int]] | None:
    """The ``model.item_features`` fields of one market (None when off)."""
    if cfg.model.item_features == "none":
        return None
    if cfg.model.item_features == "dense":
        return item_stat_dense(split)
    return item_stat_buckets(split, cfg.model.item_feature_buckets)


def per_market_clients(
    cfg, splits: dict[str, MarketSplit], seed: int, declaration: UploadDeclaration
) -> dict[str, ClientTrainer]:
    return {
        name: CTRClient(
            name,
            CTRData.from_split(
                split, cfg.model.use_side_features, extra_item_fields=item_feature_fields(cfg, split)
            ),
            declaration,
            **ctr_client_kwargs(cfg, seed),
        )
        for name, split in splits.items()
    }


def build_local(cfg, opts, splits, seed):
    return per_market_clients(cfg, splits, seed, LOCAL_UPLOAD), NoFederation()


def build_fedavg(cfg, opts, splits, seed):
    return per_market_clients(cfg, splits, seed, DENSE_UPLOAD), FedAvg(**opts.fedavg_kwargs())


def build_fedprox(cfg, opts, splits, seed):
    strategy = FedAvg(**opts.fedavg_kwargs(), options={"proximal_mu": opts.mu})
    return per_market_clients(cfg, splits, seed, DENSE_UPLOAD), strategy


def build_fedper(cfg, opts, splits, seed):
    return per_market_clients(cfg, splits, seed, FEDPER_UPLOAD), FedAvg(**opts.fedavg_kwargs())


# ---------------------------------------------------------------- pooled (not private)
def pool_markets(splits: dict[str, MarketSplit], item_key: str, use_side_features: bool, cfg=None) -> CTRData:
    """One index space over all markets. Users are always market-prefixed (disjoint); items are prefixed
    (``item_key="market"``) or unified by their raw key (``item_key="raw"``, e.g. ASIN or title)."""
    per = {
        n: CTRData.from_split(
            s, use_side_features, extra_item_fields=None if cfg is None else item_feature_fields(cfg, s)
        )
        for n, s in splits.items()
    }
    first = next(iter(per.values()))
    for name, d in per.items():
        if list(d.fields) != list(first.fields):
            raise ConfigError(
                f"market {name!r} has fields {list(d.fields)}, others {list(first.fields)}: cannot pool"
            )
    user_off = np.cumsum([0] + [len(d.user_x) for d in per.values()])
    if item_key == "market":
        item_off = np.cumsum([0] + [len(d.item_x) for d in per.values()])
        item_maps = {n: np.arange(len(d.item_x)) + item_off[i] for i, (n, d) in enumerate(per.items())}
        item_x = torch.cat([d.item_x for d in per.values()])
        item_x[:, 0] = torch.arange(len(item_x))
    elif item_key == "raw":
        raw = np.concatenate([splits[n].market.item_ids.astype(str) for n in per])
        codes, uniques = pd.factorize(raw)
        item_maps, start = {}, 0
        for n, d in per.items():
            item_maps[n] = codes[start : start + len(d.item_x)].astype(np.int64)
            start += len(d.item_x)
        item_x = torch.zeros((len(uniques), first.item_x.shape[1]), dtype=torch.long)
        for n, d in reversed(list(per.items())):  # side features from the first market holding the item
            item_x[torch.from_numpy(item_maps[n])] = d.item_x
        item_x[:, 0] = torch.arange(len(uniques))
    else:
        raise ConfigError(f"method.options.item_key must be 'market' or 'raw', got {item_key!r}")
    user_x = torch.cat([d.user_x for d in per.values()])
    user_x[:, 0] = torch.arange(len(user_x))
    views, tu, ti = {}, [], []
    for i, (n, d) in enumerate(per.items()):
        user_map = np.arange(len(d.user_x)) + user_off[i]
        views[n] = MarketView(splits[n], user_map, item_maps[n])
        tu.append(user_map[d.train_users])
        ti.append(item_maps[n][d.train_items])
    train_users, train_items = np.concatenate(tu), np.concatenate(ti)
    fields = dict(first.fields)
    fields["user"], fields["item"] = len(user_x), len(item_x)
    return CTRData(
        user_x=user_x,
        item_x=item_x,
        fields=fields,
        num_user_fields=first.num_user_fields,
        train_users=train_users,
        train_items=train_items,
        train_seen=SeenItems.build(train_users, train_items, len(user_x), len(item_x)),
        views=views,
    )


@dataclass
class CentralizedOptions:
    item_key: str = "market"

    def validate(self, prefix: str) -> None:
        if self.item_key not in ("market", "raw"):
            raise ConfigError(f"{prefix}.item_key must be 'market' or 'raw', got {self.item_key!r}")


def build_centralized(cfg, opts, splits, seed):
    data = pool_markets(splits, opts.item_key, cfg.model.use_side_features, cfg)
    client = CTRClient("pooled", data, POOLED_UPLOAD, **ctr_client_kwargs(cfg, seed))
    return {"pooled": client}, NoFederation()


def build_central_shared(cfg, opts, splits, seed):
    return build_centralized(cfg, CentralizedOptions(item_key="raw"), splits, seed)


register(Method("local", LOCAL_UPLOAD, build_local, NoOptions, summary="each market alone, no federation"))
register(
    Method(
        "fedavg",
        DENSE_UPLOAD,
        build_fedavg,
        FedAvgOptions,
        summary="FedAvg over the dense layers",
        declare=in_force(DENSE_UPLOAD),
    )
)
register(
    Method(
        "fedprox",
        DENSE_UPLOAD,
        build_fedprox,
        FedProxOptions,
        summary="FedProx (proximal term μ)",
        declare=in_force(DENSE_UPLOAD),
    )
)
register(
    Method(
        "fedper",
        FEDPER_UPLOAD,
        build_fedper,
        FedAvgOptions,
        summary="FedPer: shared body, local head",
        declare=in_force(FEDPER_UPLOAD),
    )
)
register(
    Method(
        "centralized",
        POOLED_UPLOAD,
        build_centralized,
        CentralizedOptions,
        private=False,
        summary="NOT PRIVATE: pooled data, market-prefixed IDs",
    )
)
register(
    Method(
        "central_shared_ids",
        POOLED_UPLOAD,
        build_central_shared,
        NoOptions,
        private=False,
        summary="NOT PRIVATE: pooled data, items keyed by the shared raw key (ASIN/title)",
    )
)
