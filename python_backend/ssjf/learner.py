"""Learning from served traffic: how well the proxy ranks, and a head that refreshes itself.

`RankWindow` keeps the last N finished requests' (predicted, true) lengths and says how well the
predictions rank them (Kendall tau) and size them (MAE): the live view of the proxy on this
traffic, which the llm model publishes as metrics.

`OnlineHead` learns a correction to an artifact's head from requests whose true length is now
known: predicted log length = base head + a linear map of the same features, fitted by ridge
regression on a bounded window of recent rows. The prior is the shipped head itself (a zero
correction), so few rows change little. A refit is swapped in only when, on recent rows held back
from the fit, it ranks at least as well as the head in use; the swap is one reference assignment,
so predicting never takes a lock. Memory is bounded by the window.
"""

from __future__ import annotations

import collections
import threading

import numpy as np
from scipy import stats


def kendall_tau(pred, true) -> float:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if len(pred) < 2 or np.ptp(pred) == 0 or np.ptp(true) == 0:
        return 0.0
    return float(stats.kendalltau(pred, true).statistic)


class RankWindow:
    """(predicted, true) lengths of the last `size` finished requests."""

    def __init__(self, size: int = 500):
        self.pairs: collections.deque[tuple[int, int]] = collections.deque(maxlen=size)

    def add(self, predicted: int | None, true: int) -> None:
        if predicted is not None and predicted > 0 and true > 0:
            self.pairs.append((predicted, true))

    def __len__(self) -> int:
        return len(self.pairs)

    def kendall_tau(self) -> float:
        if len(self.pairs) < 2:
            return 0.0
        pred, true = zip(*self.pairs)
        return kendall_tau(pred, true)

    def mae_tokens(self) -> float:
        if not self.pairs:
            return 0.0
        a = np.asarray(self.pairs, dtype=np.float64)
        return float(np.mean(np.abs(a[:, 0] - a[:, 1])))


class OnlineHead:
    """A head (anything with predict_log(features)) plus a correction learned from served rows."""

    L2 = (1.0, 10.0, 100.0, 1000.0)

    def __init__(self, base, window: int = 2000, min_rows: int = 64, holdout_every: int = 5):
        self.base = base
        self.rows: collections.deque[tuple[np.ndarray, float]] = collections.deque(maxlen=window)
        self.min_rows = min_rows
        self.holdout_every = holdout_every  # every k-th recent row is held back to validate a refit
        self._fit = None  # (mean, std, coef, bias) of the correction in use; None: the base alone
        self.version = 0  # refits swapped in
        self.rejected = 0  # refits that ranked worse than the head in use
        self._refitting = threading.Lock()  # one refit at a time (never taken by predict)

    def observe(self, x: np.ndarray, true_length: int) -> None:
        """A finished request: its proxy features and its true output length."""
        if true_length > 0:
            self.rows.append((np.asarray(x, dtype=np.float32), float(np.log1p(true_length))))

    def _correction(self, fit, x: np.ndarray) -> np.ndarray:
        mean, std, coef, bias = fit
        return ((x - mean) / std) @ coef + bias

    def predict_log(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=np.float32))
        base = self.base.predict_log(x)
        fit = self._fit  # one read: a swap in between changes nothing here
        return base if fit is None else base + self._correction(fit, x)

    def _ridge(self, x: np.ndarray, r: np.ndarray, l2: float):
        mean, std = x.mean(0), x.std(0) + 1e-6
        z = (x - mean) / std
        bias = float(r.mean())
        coef = np.linalg.solve(z.T @ z + l2 * len(z) ** 0.5 * np.eye(z.shape[1]), z.T @ (r - bias))
        return mean, std, coef.astype(np.float32), bias

    def refit(self) -> bool:
        """Fit on the window (but every holdout_every-th row), keep the best L2 by held-back tau,
        and swap it in if it ranks the held-back rows at least as well as the head in use."""
        with self._refitting:
            rows = list(self.rows)
            if len(rows) < self.min_rows:
                return False
            x = np.stack([r[0] for r in rows])
            y = np.array([r[1] for r in rows])
            held = np.zeros(len(rows), dtype=bool)
            held[self.holdout_every - 1::self.holdout_every] = True
            base = self.base.predict_log(x)
            current = base if self._fit is None else base + self._correction(self._fit, x)
            best_tau, best = kendall_tau(current[held], y[held]), None
            for l2 in self.L2:
                fit = self._ridge(x[~held], y[~held] - base[~held], l2)
                tau = kendall_tau(base[held] + self._correction(fit, x[held]), y[held])
                if tau > best_tau:
                    best_tau, best = tau, l2
            if best is None:
                self.rejected += 1
                return False
            self._fit = self._ridge(x, y - base, best)  # the chosen L2, refitted on every row
            self.version += 1
            return True
