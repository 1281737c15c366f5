"""The proxy's head: the features it reads, and a small MLP in numpy that maps them to a
predicted log length (whatever the training objective, one number per prompt)."""

from __future__ import annotations

import numpy as np


def features(emb: np.ndarray, prompt_lens: np.ndarray, model_ids: np.ndarray | None = None,
             num_models: int = 0) -> np.ndarray:
    parts = [emb, np.log1p(prompt_lens)[:, None]]
    if num_models:
        onehot = np.zeros((len(emb), num_models), dtype=np.float32)
        onehot[np.arange(len(emb)), model_ids] = 1.0
        parts.append(onehot)
    return np.hstack(parts).astype(np.float32)


class Head:
    """An MLP (numpy inference) mapping standardised features to a predicted log length."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.mean, self.std = arrays["mean"], arrays["std"]
        self.weights = [(arrays[f"w{i}"], arrays[f"b{i}"]) for i in range(int(arrays["num_layers"]))]
        self.centers = arrays.get("centers")  # classification: log length of each bucket
        self.calib = arrays.get("calib")  # ranking: log length = a * score + b

    def predict_log(self, x: np.ndarray) -> np.ndarray:
        h = (x - self.mean) / self.std
        for i, (w, b) in enumerate(self.weights):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.maximum(h, 0.0)
        if self.centers is not None:
            p = np.exp(h - h.max(1, keepdims=True))
            return (p / p.sum(1, keepdims=True)) @ self.centers
        h = h[:, 0]
        if self.calib is not None:
            h = self.calib[0] * h + self.calib[1]
        return h
