"""The proxy model: a sentence encoder and a small head that predicts output length.

An artifact is one .npz file: the head's arrays plus `meta`, a JSON string naming the
encoder, the tokenizer lengths were counted with, the data and the metrics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .assets import resolve_encoder

ARTIFACT_DIR = Path(__file__).resolve().parent / "artifacts"
DEFAULT_ARTIFACT = "recorded"


def resolve_artifact(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".npz" and path.exists():
        return path
    candidate = ARTIFACT_DIR / f"{name}.npz"
    if candidate.exists():
        return candidate
    known = ", ".join(sorted(p.stem for p in ARTIFACT_DIR.glob("*.npz")))
    raise FileNotFoundError(f"no proxy artifact {name!r} (known: {known}; or pass a .npz path)")


class Encoder:
    """Mean-pooled, L2-normalised sentence embeddings from any HF encoder."""

    def __init__(self, name: str = "minilm", device: str = "cpu", max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        path = resolve_encoder(name)
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(self.device).eval()
        self.max_length = max_length

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings [n, dim] and prompt lengths in encoder tokens [n] (untruncated count capped at 8k)."""
        embs, lens = [], []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            embs.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
            lens.extend(min(len(ids), 8192) for ids in self.tokenizer(chunk, add_special_tokens=False)["input_ids"])
        return np.concatenate(embs), np.asarray(lens, dtype=np.float32)


def features(emb: np.ndarray, prompt_lens: np.ndarray) -> np.ndarray:
    return np.hstack([emb, np.log1p(prompt_lens)[:, None]]).astype(np.float32)


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Ridge regression on standardised features; returns (w, b, mean, std)."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    w = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return w.astype(np.float32), float(y.mean()), mean.astype(np.float32), std.astype(np.float32)


class LengthPredictor:
    """prompt -> predicted output length in tokens (of the served model's tokenizer)."""

    def __init__(self, artifact: str = DEFAULT_ARTIFACT, device: str = "cpu", encoder: Encoder | None = None):
        path = resolve_artifact(artifact)
        with np.load(path, allow_pickle=False) as data:
            self.meta = json.loads(str(data["meta"]))
            self.w, self.b = data["w"], float(data["b"])
            self.mean, self.std = data["mean"], data["std"]
        self.encoder = encoder or Encoder(self.meta["encoder"], device, self.meta.get("max_length", 256))
        self.max_length_tokens = int(self.meta.get("max_prediction", 8192))

    def predict_log(self, texts: list[str]) -> np.ndarray:
        emb, lens = self.encoder.encode(texts)
        return ((features(emb, lens) - self.mean) / self.std) @ self.w + self.b

    def predict(self, texts: list[str]) -> np.ndarray:
        """Predicted lengths (int32, >= 1)."""
        pred = np.expm1(self.predict_log(texts))
        return np.clip(np.rint(pred), 1, self.max_length_tokens).astype(np.int32)

    def latency_ms(self, text: str, repeats: int = 20) -> float:
        self.predict([text])
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            self.predict([text])
            times.append((time.perf_counter() - t) * 1000)
        return float(np.median(times))


def save_artifact(path: Path, w, b, mean, std, meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, w=w, b=np.float32(b), mean=mean, std=std, meta=np.asarray(json.dumps(meta)))
