"""Checkpoints that cannot run code or be corrupted silently.

A checkpoint is one safetensors file: every tensor and numpy array of the (nested) state is a tensor of the
file, and the rest of the state — dicts, lists, numbers, strings — is JSON in the file's metadata, with each
array replaced by a reference. Loading it executes nothing (no pickle). A SHA-256 of the file is written
beside it (``<file>.sha256``) and verified on load, so flipped or truncated bytes are one error naming the
file instead of a run that quietly continues on other numbers. Each save keeps the previous checkpoint as
``<file>.prev`` (with its checksum); `load_state` falls back to it only when asked (``fallback=True``).

Writes are atomic: each file goes to a temporary name and is renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmarket.errors import FedmarketError

log = logging.getLogger(__name__)

FORMAT = "fedmarket-checkpoint-1"


class CheckpointError(FedmarketError):
    """A checkpoint that is missing, truncated, corrupt or not a fedmarket checkpoint."""


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return {"__objects__": [_encode(v, tensors) for v in value.tolist()]}
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(value.copy(order="C"))  # (ascontiguousarray makes 0-d arrays 1-d)
        return {"__ndarray__": key}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, set | frozenset):
        return {"__set__": [_encode(v, tensors) for v in sorted(value, key=repr)]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot checkpoint a {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]].clone()
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().copy()
    if "__objects__" in value:
        return np.array([_decode(v, tensors) for v in value["__objects__"]], dtype=object)
    if "__items__" in value:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value["__items__"]}
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__set__" in value:
        return {_hashable(_decode(v, tensors)) for v in value["__set__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list | tuple) else value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def previous_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def save_state(path: str | Path, state: Any, keep_previous: bool = True) -> Path:
    """Write ``state`` (nested dicts/lists of tensors, arrays, numbers and strings) to ``path`` with its
    checksum; the checkpoint it replaces becomes ``<path>.prev`` when ``keep_previous``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_encode(state, tensors), allow_nan=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "state": skeleton})
    digest = _sha256(tmp)
    tmp_sum = checksum_path(tmp)
    tmp_sum.write_text(digest + "\n")
    if keep_previous and path.exists():
        os.replace(path, previous_path(path))
        if checksum_path(path).exists():
            os.replace(checksum_path(path), checksum_path(previous_path(path)))
    os.replace(tmp, path)
    os.replace(tmp_sum, checksum_path(path))
    return path


def _load_one(path: Path) -> Any:
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    expected_file = checksum_path(path)
    if not expected_file.is_file():
        raise CheckpointError(f"checkpoint {path} has no checksum file {expected_file.name}; not loaded")
    expected = expected_file.read_text().strip()
    if _sha256(path) != expected:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated (SHA-256 differs from {expected_file.name})"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # the checksum matched, so this is not a fedmarket checkpoint
        raise CheckpointError(f"checkpoint {path} is not a fedmarket checkpoint ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file")
    return _decode(json.loads(meta["state"]), tensors)


def load_state(path: str | Path, fallback: bool = False) -> Any:
    """The state saved at ``path``, checksum verified. A missing, corrupt or truncated file is one
    `CheckpointError` naming it; with ``fallback=True`` the previous checkpoint (``<path>.prev``) is loaded
    instead when it is sound (logged)."""
    path = Path(path)
    try:
        return _load_one(path)
    except CheckpointError as exc:
        prev = previous_path(path)
        if not fallback or not prev.exists():
            raise
        log.warning("%s; falling back to the previous checkpoint %s", exc, prev)
        return _load_one(prev)
