"""The lab's on-disk cache of proxy embeddings, keyed by the encoder's settings and each prompt's
text: training, leave-one-source-out runs and offline evaluation encode the same prompts again
and again. The server never uses it."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from ssjf.config import cache_dir


def encode_cached(encoder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """encode() with an on-disk cache keyed by encoder settings and prompt text."""
    path = cache_dir() / "embeddings" / (hashlib.sha1(encoder.key.encode()).hexdigest()[:16] + ".npz")
    known: dict[str, tuple[np.ndarray, float]] = {}
    if path.exists():
        with np.load(path) as d:
            known = {h: (e, n) for h, e, n in zip(d["hashes"], d["emb"], d["lens"])}
    hashes = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
    missing = sorted({h: t for h, t in zip(hashes, texts) if h not in known}.items())
    if missing:
        emb, lens = encoder.encode([t for _, t in missing])
        known.update({h: (e, n) for (h, _), e, n in zip(missing, emb, lens)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez(tmp, hashes=np.array(list(known)), emb=np.stack([v[0] for v in known.values()]),
                 lens=np.array([v[1] for v in known.values()], dtype=np.float32))
        tmp.rename(path)
    return np.stack([known[h][0] for h in hashes]), np.array([known[h][1] for h in hashes], dtype=np.float32)


def cached_encode(predictor):
    """`encode` for LengthPredictor.features / predict: its encoder through this cache."""
    return lambda texts: encode_cached(predictor.encoder, texts)
