"""One market's selected model as a file: weights, the feature tables it reads, and its spec.

Why a separate file from the round checkpoint: the checkpoint holds the LAST round's whole training state
(optimizers, strategy, history) and grids delete it; what production needs is the round the run reports
(the best validation round, "selected round") and only what scoring reads. The in-process runtime keeps
each trainer's state at its best validation round (`Simulator.best`) and loads it back before testing; at
the end of a seed `write_selected_models` asks each trainer's export hook (``export_model(market)``) for
that model and writes ``models/seed<N>/<market>.safetensors`` (+ ``.sha256``) and ``index.json``.

A model file is safetensors: tensors ``weight/<name>`` (the model's ``state_dict``) and ``table/<name>``
(feature tables in the market's own user/item index order, e.g. CTR ``user_x`` / ``item_x``, or a
sequential model's item text vectors), and JSON metadata (format, family, spec). Loading runs no code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedmarket.errors import FedmarketError

FORMAT = "fedmarket-model-1"
FAMILIES = ("ctr", "seq", "mtl")


class ExportError(FedmarketError):
    """A run, model file or export that cannot be exported, loaded or served (the message names it)."""


class NotExportable(ExportError):
    """Raised by an export hook whose model cannot serve arbitrary (user, item) pairs; the message says why
    and lands in ``models/seed<N>/index.json`` → ``not_exported``."""


@dataclass
class ModelExport:
    """What a trainer's export hook returns for one market: enough to score without the trainer."""

    family: str  # "ctr" / "mtl" (pairwise model over user/item fields) or "seq" (next item from a history)
    spec: dict[str, Any]  # JSON-able: model name, options, field sizes
    weights: dict[str, torch.Tensor]
    tables: dict[str, torch.Tensor] = field(default_factory=dict)  # market-local row order


# ------------------------------------------------------------------ hooks (called by the trainers)
def ctr_export(
    model: torch.nn.Module, name: str, options: dict[str, Any], data: Any, market: str
) -> ModelExport:
    """A CTR model (`fedmarket.models.ctr`) and the rows of its feature tables for ``market``'s own users and
    items (a pooled model keeps every market's rows; the market's view maps them)."""
    view = data.views[market]
    return ModelExport(
        family="ctr",
        spec={
            "model": name,
            "options": _jsonable(options),
            "fields": {k: int(v) for k, v in data.fields.items()},
            "num_user_fields": int(data.num_user_fields),
        },
        weights=dict(model.state_dict()),
        tables={
            "user_x": data.user_x[torch.from_numpy(view.user_map)],
            "item_x": data.item_x[torch.from_numpy(view.item_map)],
        },
    )


def seq_export(model: torch.nn.Module, opts: Any, data: Any, market: str) -> ModelExport:
    """A SASRec (`fedmarket.models.sasrec`): its item text vectors (market data, not a parameter) and the map
    from the market's items to the model's item rows (identity unless pooled)."""
    view = data.views[market]
    tables = {"item_map": torch.from_numpy(view.item_map.astype("int64"))}
    if getattr(model, "text_vectors", None) is not None:
        tables["text_vectors"] = model.text_vectors
    spec = {
        "model": "sasrec",
        "num_items": int(model.num_items),
        "options": {
            "hidden_dim": int(opts.hidden_dim),
            "num_layers": int(opts.num_layers),
            "num_heads": int(opts.num_heads),
            "max_len": int(opts.max_len),
            "dropout": float(opts.dropout),
            "adaptor": str(opts.adaptor),
            "num_experts": int(opts.num_experts),
            "use_id": model.id_embedding is not None,
            "adapter_dim": int(opts.adapter_dim),
        },
    }
    return ModelExport("seq", spec, dict(model.state_dict()), tables)


def mtl_export(model: torch.nn.Module, options: dict[str, Any], data: Any, market: str) -> ModelExport:
    """An MMoE (`fedmarket.models.mmoe`) as a pairwise (user, item) model. Impressions carry per-row fields,
    so this works only when every field is fixed by the user or by the item (the ML-1M proxy and synthetic
    scenarios: ID, demographics, genres); dense features, a field that varies within a user and within an
    item (a context feature) or a pooled model raise `NotExportable` naming it. The hook also supplies what
    the export would otherwise take from a `MarketSplit`: the user/item keys (the scenario's ``id_user`` /
    ``id_item`` codes), the catalog (items with a train impression), each user's clicked train items in time
    order and train clicks per item (the popularity fallback)."""
    import numpy as np

    fields = list(data.fields)
    if "feat_scenario" in fields or len(data.views) != 1:
        raise NotExportable("a pooled multi-task reference is not exportable (scenario-prefixed IDs)")
    if data.dense.shape[1]:
        raise NotExportable(
            f"impressions carry {data.dense.shape[1]} dense context features: the export would lack user/item "
            "tables to score arbitrary (user, item) pairs"
        )
    for needed in ("id_user", "id_item"):
        if needed not in fields:
            raise NotExportable(f"no {needed} field: cannot score arbitrary (user, item) pairs")
    sparse = data.sparse.numpy()
    u_col, i_col = fields.index("id_user"), fields.index("id_item")
    users, user_rows = np.unique(sparse[:, u_col], return_index=True)
    items, item_rows = np.unique(sparse[:, i_col], return_index=True)
    # one sort per side; a field belongs to a side when it never changes within a run of the same key
    by_key = {}
    for side, key_col in (("user", u_col), ("item", i_col)):
        order = np.argsort(sparse[:, key_col], kind="stable")
        by_key[side] = (order, np.diff(sparse[order, key_col]) != 0)
    sides = []
    for col, name in enumerate(fields):
        for side, (order, new_key) in by_key.items():
            if (new_key | (np.diff(sparse[order, col]) == 0)).all():  # one value per user (item)
                sides.append((side, col))
                break
        else:
            raise NotExportable(
                f"field {name!r} varies within a user and within an item (a context feature): the export would "
                "lack what is needed to score arbitrary (user, item) pairs"
            )
    user_cols = [c for side, c in sides if side == "user"]
    item_cols = [c for side, c in sides if side == "item"]
    user_x = torch.from_numpy(sparse[user_rows][:, user_cols])
    item_x = torch.from_numpy(sparse[item_rows][:, item_cols])
    train = np.sort(data.train_index)
    clicked = train[data.click.numpy()[train] > 0]
    u_pos = np.searchsorted(users, sparse[clicked, u_col])
    i_pos = np.searchsorted(items, sparse[clicked, i_col])
    order = np.lexsort((np.arange(len(clicked)), u_pos))  # rows are in time order within a user
    catalog = np.zeros(len(items), dtype=bool)
    catalog[np.searchsorted(items, np.unique(sparse[train, i_col]))] = True
    return ModelExport(
        family="mtl",
        spec={
            "model": "mmoe",
            "options": _jsonable(options),
            "fields": {k: int(v) for k, v in data.fields.items()},
            "sides": [
                [side, user_cols.index(c) if side == "user" else item_cols.index(c)] for side, c in sides
            ],
        },
        weights=dict(model.state_dict()),
        tables={
            "user_x": user_x,
            "item_x": item_x,
            "user_keys": torch.from_numpy(users.astype(np.int64)),
            "item_keys": torch.from_numpy(items.astype(np.int64)),
            "catalog": torch.from_numpy(catalog),
            "history_indptr": torch.from_numpy(
                np.concatenate([[0], np.cumsum(np.bincount(u_pos, minlength=len(users)))]).astype(np.int64)
            ),
            "history_items": torch.from_numpy(i_pos[order].astype(np.int64)),
            "popularity": torch.from_numpy(np.bincount(i_pos, minlength=len(items)).astype(np.int64)),
        },
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


# ------------------------------------------------------------------ files
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model_file(path: Path, export: ModelExport, meta: dict[str, Any] | None = None) -> Path:
    """Write ``export`` to ``path`` (safetensors) and ``<path>.sha256``; the caller renames the folder."""
    from safetensors.torch import save_file

    tensors = {f"weight/{k}": v.detach().cpu().clone().contiguous() for k, v in export.weights.items()}
    tensors.update({f"table/{k}": v.detach().cpu().clone().contiguous() for k, v in export.tables.items()})
    metadata = {
        "format": FORMAT,
        "family": export.family,
        "spec": json.dumps(export.spec),
        "meta": json.dumps(meta or {}),
    }
    save_file(tensors, str(path), metadata=metadata)
    Path(str(path) + ".sha256").write_text(sha256_of(path) + "\n")
    return path


def read_model_file(path: str | Path, verify: bool = True) -> tuple[ModelExport, dict[str, Any]]:
    """The `ModelExport` and metadata in ``path``; a missing, corrupt or foreign file is one `ExportError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"model file {path} does not exist")
    if verify:
        sum_file = Path(str(path) + ".sha256")
        if not sum_file.is_file():
            raise ExportError(f"model file {path} has no checksum file {sum_file.name}; not loaded")
        if sha256_of(path) != sum_file.read_text().strip():
            raise ExportError(
                f"model file {path} is corrupt or truncated (SHA-256 differs from {sum_file.name})"
            )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ExportError(f"model file {path} is not a safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise ExportError(f"model file {path} is not a {FORMAT} file")
    family = metadata.get("family")
    if family not in FAMILIES:
        raise ExportError(f"model file {path} has unknown model family {family!r}")
    weights = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("weight/")}
    tables = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("table/")}
    export = ModelExport(family, json.loads(metadata["spec"]), weights, tables)
    return export, json.loads(metadata.get("meta") or "{}")


def write_selected_models(
    trainers: dict[str, Any], selected: dict[str, int], folder: str | Path, seed: int
) -> list[Path]:
    """Write each market's selected model (the trainers hold their selected states: `Simulator.finish`
    loaded them) to ``folder/<market>.safetensors`` and ``folder/index.json``. A trainer without an export
    hook, or one that has no model to export (e.g. FedMM before its CTR phase), is listed in the index with
    the reason. The folder is assembled under ``<folder>.partial`` and renamed: it appears whole or not at
    all, and replaces the folder of an earlier attempt at this seed."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index: dict[str, Any] = {"format": FORMAT, "seed": int(seed), "markets": {}, "not_exported": {}}
    written = []
    try:
        for name, trainer in trainers.items():
            for market in trainer.markets:
                if name not in selected:
                    index["not_exported"][market] = "no validated round was selected"
                    continue
                try:
                    export = trainer.export_model(market)
                except (NotExportable, NotImplementedError) as exc:
                    index["not_exported"][market] = str(exc)
                    continue
                if export is None:
                    index["not_exported"][market] = "the selected state holds no scoring model"
                    continue
                meta = {
                    "market": market,
                    "seed": int(seed),
                    "selected_round": int(selected[name]),
                    "trainer": name,
                }
                save_model_file(tmp / f"{market}.safetensors", export, meta)
                index["markets"][market] = {"file": f"{market}.safetensors", "family": export.family, **meta}
                written.append(folder / f"{market}.safetensors")
        (tmp / "index.json").write_text(json.dumps(index, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


# ------------------------------------------------------------------ rebuilding
def build_model(export: ModelExport, where: str) -> torch.nn.Module:
    """The model of ``export`` with its weights loaded, in eval mode (``where`` names the file in errors)."""
    spec = export.spec
    try:
        if export.family == "ctr":
            from fedmarket.models.ctr import build_ctr_model

            options = dict(spec.get("options") or {})
            if "hidden" in options:
                options["hidden"] = tuple(options["hidden"])
            model = build_ctr_model(
                spec["model"], dict(spec["fields"]), int(spec["num_user_fields"]), **options
            )
        elif export.family == "mtl":
            from fedmarket.models.mmoe import MMoE

            options = {
                k: tuple(v) if isinstance(v, list) else v for k, v in (spec.get("options") or {}).items()
            }
            model = MMoE(dict(spec["fields"]), 0, **options)
        else:
            from fedmarket.models.sasrec import SASRec

            text = export.tables.get("text_vectors")
            model = SASRec(int(spec["num_items"]), text, **dict(spec["options"]))
        model.load_state_dict(export.weights, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{where}: the {export.family} model does not match its spec ({first})") from None
    model.eval()
    return model
