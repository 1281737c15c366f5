"""The proxy model: a sentence encoder and a small head that predicts output length.

Features = [mean-pooled, L2-normalised encoder embedding, log(1 + prompt tokens),
one-hot of the answering model (when the artifact conditions on it)]. The head is a
small MLP run in numpy. Whatever the training objective (regression on log length,
classification over length buckets, pairwise ranking), the head ends in one number per
prompt, a predicted log length, so serving is the same for all of them.

An artifact is one .npz file: the head's arrays plus `meta`, a JSON string naming the
encoder (and how many of its layers), the tokenizer lengths were counted with, the
target model, the data and the test metrics. A fine-tuned encoder travels as low-rank
adapters (`adapter.<module>.a`/`.b` for each linear layer, `adapter.<module>.weight`/`.bias`
for each LayerNorm): 1.6 MB at rank 32 for MiniLM-3, merged into the packaged encoder's weights at load,
so serving costs the same as the frozen encoder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..config import cache_dir
from .encoder import ADAPTER, Encoder, encoder_dtype
from .head import Head, features

PACKAGED_ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # shipped with the package, read-only
DEFAULT_ARTIFACT = "smollm2"


def read_meta(artifact: str) -> dict:
    """An artifact's metadata (encoder, data, split, metrics) without loading its encoder."""
    with np.load(resolve_artifact(artifact), allow_pickle=False) as data:
        return json.loads(str(data["meta"]))


def resolve_artifact(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".npz" and path.exists():
        return path
    for folder in (user_artifacts(), PACKAGED_ARTIFACTS):  # a user's artifact shadows a packaged one
        candidate = folder / f"{name}.npz"
        if candidate.exists():
            return candidate
    known = ", ".join(sorted({p.stem for d in (user_artifacts(), PACKAGED_ARTIFACTS) for p in d.glob("*.npz")}))
    raise FileNotFoundError(f"no proxy artifact {name!r} (known: {known}; or pass a .npz path)")


def user_artifacts() -> Path:
    """Where `ssjf train-proxy --name NAME` saves NAME.npz: the cache directory, never the package."""
    return cache_dir() / "artifacts"


class LengthPredictor:
    """prompt -> predicted output length in tokens of the target model's tokenizer."""

    MAX_CHARS = 262144

    def __init__(self, artifact: str = DEFAULT_ARTIFACT, device: str = "cpu", encoder: Encoder | None = None,
                 dtype: str = "auto"):
        """dtype: the encoder's; "auto" picks by the hardware (ssjf.cpus.resolve_dtype), whatever the
        artifact was trained in (the head reads fp32 embeddings either way)."""
        self.path = resolve_artifact(artifact)
        with np.load(self.path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        self.meta = json.loads(str(arrays.pop("meta")))
        adapters = {k: arrays.pop(k) for k in list(arrays) if k.startswith(ADAPTER)}
        self.head = Head(arrays)
        enc = self.meta["encoder"]
        if encoder is None:
            encoder = Encoder(enc["name"], device, enc["max_length"], enc["layers"], encoder_dtype(dtype, device, enc),
                              enc.get("pooling", "mean"))
            if adapters:
                encoder.load_adapters(adapters, self.path.name + ":" + hashlib.sha1(self.path.read_bytes()).hexdigest()[:12])
        self.encoder = encoder
        self.models: list[str] = self.meta.get("models", [])
        self.target_model = self.meta.get("target_model", "")
        self.max_prediction = int(self.meta.get("max_prediction", 8192))

    def _model_ids(self, n: int, models: list[str] | None) -> np.ndarray | None:
        if not self.models:
            return None
        index = {m: i for i, m in enumerate(self.models)}
        default = index.get(self.target_model, 0)
        return np.array([index.get(m, default) for m in (models or [self.target_model] * n)])

    def features(self, texts: list[str], models: list[str] | None = None, encode=None) -> np.ndarray:
        """The head's input for each text (embedding, log prompt length, model one-hot). Texts are
        cut at MAX_CHARS: far past any context, and a huge body must not cost seconds of
        tokenization here before the LLM rejects it. `encode`: the encoder's own unless given
        (the lab passes one through its embedding cache)."""
        texts = [t[: self.MAX_CHARS] for t in texts]
        emb, lens = (encode or self.encoder.encode)(texts)
        return features(emb, lens, self._model_ids(len(texts), models), len(self.models))

    def predict_log(self, texts: list[str], models: list[str] | None = None, encode=None) -> np.ndarray:
        return self.head.predict_log(self.features(texts, models, encode))

    def to_lengths(self, log_lengths: np.ndarray) -> np.ndarray:
        """Predicted log lengths as token counts (int32, >= 1, at most max_prediction)."""
        return np.clip(np.rint(np.expm1(log_lengths)), 1, self.max_prediction).astype(np.int32)

    def predict(self, texts: list[str], models: list[str] | None = None, encode=None) -> np.ndarray:
        """Predicted lengths (int32, >= 1)."""
        return self.to_lengths(self.predict_log(texts, models, encode))

    @property
    def served_width(self) -> int:
        """Columns of the features predict_served sends: the head's input, then its prediction."""
        return len(self.head.mean) + 1

    def predict_served(self, texts: list[str], correction=None) -> tuple[np.ndarray, np.ndarray]:
        """What the served proxy answers: lengths after the refreshed correction (a
        learner.CorrectionFile, or None), and the features it sends on to the llm (the head's input,
        then the head's own log prediction) so that the llm can learn from the true lengths."""
        x = self.features(texts)
        base = self.head.predict_log(x)
        served = np.hstack([x, base[:, None]]).astype(np.float32)
        log_lengths = base if correction is None else correction.apply(served, base)
        return self.to_lengths(log_lengths), served
