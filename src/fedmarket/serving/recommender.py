"""Top-K recommendation and pair scoring from one market's export (`fedmarket.serving.export`).

Loading verifies every file against ``manifest.json`` and reads only safetensors, JSON and CSV: no run
folder, no data, no trainer, no pickle. What is ranked is the market's catalog (items with a train
interaction), as in the evaluation protocol; ``exclude_history`` drops the user's train items.

Scores: CTR family, the model's logit for (user, item) (higher = more likely to be clicked; sigmoid gives the
probability); sequential family, ⟨state after the user's train sequence, item representation⟩; multi-task
family, the probability of the chosen task (``ctr``: p_CTR, ``ctcvr``: p_CTCVR, the click-and-convert one). A user the
export does not know (or a sequential user without train history) gets the most popular catalog items
(train interactions per item) and ``source = "popularity"``, with the interaction count as score.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedmarket.errors import FedmarketError
from fedmarket.serving.export import EXPORT_FORMAT, MANIFEST
from fedmarket.serving.models import ExportError, ModelExport, build_model, sha256_of

TASKS = ("ctr", "ctcvr")
MAX_K = 1000


class ServingInputError(FedmarketError):
    """A request the export cannot answer: unknown item, k out of range, wrong task (the message says which)."""


def find_export(path: str | Path) -> Path:
    """``path`` itself when it is one market's export, or its only market sub-folder; else one error
    naming the market folders to choose from."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if not path.is_dir():
        raise ExportError(f"export folder {path} does not exist")
    found = sorted(p.parent for p in path.glob(f"*/{MANIFEST}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ExportError(f"{path} is not a fedmarket export (no {MANIFEST} in it or in a market sub-folder)")
    raise ExportError(
        f"{path} holds the exports of {[p.name for p in found]}; pass one of them, e.g. {found[0]}"
    )


def _verify(folder: Path) -> dict[str, Any]:
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{folder / MANIFEST} is not a {EXPORT_FORMAT} manifest")
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise ExportError(f"export {folder} is incomplete: {name} is missing")
        if sha256_of(path) != digest:
            raise ExportError(
                f"export {folder}: {name} is corrupt or changed (SHA-256 differs from {MANIFEST})"
            )
    return manifest


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


class Recommender:
    """One market's exported model, ready to rank and score."""

    def __init__(self, folder: str | Path) -> None:
        folder = find_export(folder)
        _verify(folder)
        self.folder = folder
        self.spec = json.loads((folder / "spec.json").read_text())
        self.card = json.loads((folder / "card.json").read_text())
        self.family = self.spec["family"]
        self.market = self.spec["market"]
        weights = _read_safetensors(folder / "model.safetensors")
        tables = _read_safetensors(folder / "features.safetensors")
        model_spec = {
            k: v
            for k, v in self.spec.items()
            if k in ("model", "options", "fields", "num_user_fields", "num_items", "sides")
        }
        self.model = build_model(ModelExport(self.family, model_spec, weights, tables), str(folder))
        users = pd.read_csv(folder / "users.csv", dtype={"user": str}, keep_default_na=False)
        items = pd.read_csv(folder / "items.csv", dtype={"item": str}, keep_default_na=False)
        self.user_ids = users["user"].to_numpy(dtype=object)
        self.item_ids = items["item"].to_numpy(dtype=object)
        self.user_index = {u: i for i, u in enumerate(self.user_ids)}
        self.item_index = {it: i for i, it in enumerate(self.item_ids)}
        self.indptr = tables["history_indptr"].numpy()
        self.history = tables["history_items"].numpy()
        self.catalog = np.flatnonzero(tables["catalog"].numpy())
        self.popularity = tables["popularity"].numpy()
        # catalog position of every item (-1: outside the catalog), for excluding history
        self.position = np.full(len(self.item_ids), -1, dtype=np.int64)
        self.position[self.catalog] = np.arange(len(self.catalog))
        pop = self.popularity[self.catalog]
        self.popular = self.catalog[np.lexsort((self.catalog, -pop))]  # most interactions first, then index
        self.task = "ctr" if self.family == "mtl" else None
        with torch.no_grad():
            if self.family in ("ctr", "mtl"):
                self.user_x, self.item_x = tables["user_x"], tables["item_x"]
                self.catalog_x = self.item_x[torch.from_numpy(self.catalog)]
            else:
                item_map = torch.from_numpy(tables["item_map"].numpy())
                self.max_len = int(self.spec["options"]["max_len"])
                self.item_map = item_map.numpy()
                self.table = self.model.item_table()
                self.market_table = self.table[item_map]
                self.catalog_table = self.market_table[torch.from_numpy(self.catalog)]

    # ------------------------------------------------------------------ helpers
    @property
    def num_catalog(self) -> int:
        return len(self.catalog)

    def user_history(self, u: int) -> np.ndarray:
        return self.history[self.indptr[u] : self.indptr[u + 1]]

    def check_task(self, task: str | None) -> None:
        """Choose the task a multi-task export ranks by (``ctr`` default, or ``ctcvr``); a single-task export
        accepts none (its own task, ``ctr`` for a CTR model)."""
        if task is not None and task not in TASKS:
            raise ServingInputError(f"task must be one of {list(TASKS)}, got {task!r}")
        if self.family == "mtl":
            self.task = task or "ctr"
            return
        if task is None or (task == "ctr" and self.family == "ctr"):
            return
        raise ServingInputError(
            f"export {self.folder} is a single-task {self.family} model; --task {task} needs a multi-task export"
        )

    def _mtl_scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The chosen task's probability for aligned (user, item) index tensors: the impression row rebuilt
        from the user's and the item's fields, in the model's field order."""
        cols = [
            self.user_x[users, c] if side == "user" else self.item_x[items, c]
            for side, c in self.spec["sides"]
        ]
        p_ctr, p_ctcvr = self.model.predict(torch.stack(cols, dim=1), None)
        return p_ctr if self.task == "ctr" else p_ctcvr

    def _states(self, users: list[int]) -> torch.Tensor:
        from fedmarket.methods.seq_trainer import last_items

        seqs = [self.item_map[self.user_history(u)] for u in users]
        inputs = torch.from_numpy(last_items(seqs, self.max_len))
        return self.model.last_state(inputs, self.table)

    def _model_users(self, users: list[str]) -> tuple[list[int], list[int]]:
        """Rows of ``users`` the model can score, and their indices (others fall back to popularity)."""
        rows, idx = [], []
        for row, user in enumerate(users):
            u = self.user_index.get(str(user))
            if u is None or (self.family == "seq" and self.indptr[u] == self.indptr[u + 1]):
                continue
            rows.append(row)
            idx.append(u)
        return rows, idx

    # ------------------------------------------------------------------ ranking
    @torch.no_grad()
    def catalog_scores(self, users: list[int]) -> torch.Tensor:
        """Scores ``[len(users), catalog]`` of known users (market indices) over the catalog."""
        if self.family == "ctr":
            return self.model.score_matrix(self.user_x[torch.from_numpy(np.asarray(users))], self.catalog_x)
        if self.family == "mtl":
            n, c = len(users), len(self.catalog)
            u = torch.from_numpy(np.repeat(np.asarray(users, dtype=np.int64), c))
            i = torch.from_numpy(np.tile(self.catalog, n))
            return self._mtl_scores(u, i).view(n, c)
        return self._states(users) @ self.catalog_table.T

    def recommend(
        self, users: list[str], k: int = 10, exclude_history: bool = False, batch_size: int = 256
    ) -> pd.DataFrame:
        """Top-``k`` catalog items per user: columns user, rank (1 = best), item, score, source."""
        if not 1 <= int(k) <= MAX_K:
            raise ServingInputError(f"k must be in [1, {MAX_K}], got {k}")
        k = int(k)
        users = [str(u) for u in users]
        out: list[list[tuple[str, float, str]]] = [[] for _ in users]
        rows, idx = self._model_users(users)
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            scores = self.catalog_scores(chunk)
            if exclude_history:
                for r, u in enumerate(chunk):
                    pos = self.position[self.user_history(u)]
                    scores[r, torch.from_numpy(pos[pos >= 0])] = -torch.inf
            top = torch.topk(scores, min(k, self.num_catalog), dim=1)
            for r, row in enumerate(rows[s : s + batch_size]):
                out[row] = [
                    (self.item_ids[self.catalog[j]], float(v), "model")
                    for v, j in zip(top.values[r].tolist(), top.indices[r].tolist(), strict=True)
                    if v != -np.inf
                ]
        known = set(rows)
        fallback = [(self.item_ids[i], float(self.popularity[i]), "popularity") for i in self.popular[:k]]
        records = []
        for row, user in enumerate(users):
            ranked = out[row] if row in known else fallback
            records.extend(
                (user, rank, item, score, src) for rank, (item, score, src) in enumerate(ranked, 1)
            )
        return pd.DataFrame(records, columns=["user", "rank", "item", "score", "source"])

    # ------------------------------------------------------------------ scoring pairs
    @torch.no_grad()
    def score(self, pairs: list[tuple[str, str]]) -> pd.DataFrame:
        """Scores of (user, item) pairs: columns user, item, score, source. Unknown items are one error
        naming them; an unknown user's pairs score the item's popularity (``source = "popularity"``)."""
        unknown = sorted({str(i) for _, i in pairs if str(i) not in self.item_index})
        if unknown:
            raise ServingInputError(
                f"unknown item(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''} in market {self.market!r}"
            )
        users = [str(u) for u, _ in pairs]
        items = np.array([self.item_index[str(i)] for _, i in pairs], dtype=np.int64)
        scores = self.popularity[items].astype(np.float64) if len(items) else np.zeros(0)
        source = np.array(["popularity"] * len(pairs), dtype=object)
        rows, idx = self._model_users(users)
        if rows:
            rows_a, idx_t = np.asarray(rows), torch.from_numpy(np.asarray(idx))
            it = torch.from_numpy(items[rows_a])
            if self.family == "ctr":
                logits = self.model(torch.cat([self.user_x[idx_t], self.item_x[it]], dim=1))
            elif self.family == "mtl":
                logits = self._mtl_scores(idx_t, it)
            else:
                logits = (self._states(idx) * self.market_table[it]).sum(-1)
            scores[rows_a] = logits.double().numpy()
            source[rows_a] = "model"
        return pd.DataFrame(
            {"user": users, "item": [str(i) for _, i in pairs], "score": scores, "source": source}
        )


def read_users(path: str | Path) -> list[str]:
    """Users to recommend for: the ``user`` column of a CSV (or its first column)."""
    path = Path(path)
    if not path.is_file():
        raise ServingInputError(f"users file {path} does not exist")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if frame.empty and not len(frame.columns):
        raise ServingInputError(f"users file {path} is empty")
    column = "user" if "user" in frame.columns else frame.columns[0]
    return frame[column].tolist()


def write_recommendations(frame: pd.DataFrame, out: str | Path | None) -> None:
    """CSV (default, stdout without ``out``) or Parquet (``.parquet``), written to a temp name and renamed."""
    import os
    import sys

    if out is None:
        frame.to_csv(sys.stdout, index=False)
        return
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".parquet":
        frame.to_parquet(tmp, index=False)
    elif out.suffix == ".csv":
        frame.to_csv(tmp, index=False)
    else:
        raise ServingInputError(f"--out {out}: the suffix must be .csv or .parquet")
    os.replace(tmp, out)
