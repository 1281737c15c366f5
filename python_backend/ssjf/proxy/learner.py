"""Learning from served traffic: a head that refreshes itself (how well the proxy ranks is
metrics.RankWindow's to say).

`OnlineHead` learns a correction to an artifact's head from requests whose true length is now
known: predicted log length = base head + a linear map of the same features, fitted by ridge
regression on a bounded window of recent rows. The prior is the shipped head itself (a zero
correction), so few rows change little. A correction is used only while it ranks the window's rows
out of fold clearly better than the shipped head (`OnlineHead.refit`); the swap is one reference
assignment, so predicting never takes a lock. Memory is bounded by the window.

In the server the two halves live in Triton's two processes. The length_predictor knows each
prompt's features; the llm knows, when the request ends, its true length. So the proxy sends its
features on with the request (the `proxy_features` tensor, the head's own prediction last: a few
KB per request, and nothing to match up later), the llm's `Refresher` learns and, when a refit is
swapped in, writes the correction to one file (`CorrectionFile`, written whole then renamed),
and the proxy reloads it when the file changes (a stat at most once a second). Nothing on either
request path waits for a refit.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from ..config import RefreshConfig
from ..metrics import kendall_tau


log = logging.getLogger(__name__)


def correction(fit, x: np.ndarray) -> np.ndarray:
    """A learned correction (mean, std, coef, bias) of the log length for features x."""
    mean, std, coef, bias = fit
    return ((x - mean) / std) @ coef + bias


class OnlineHead:
    """A head (anything with predict_log(features)) plus a correction learned from served rows.

    Each refit chooses between the shipped head alone and the head plus a ridge correction (one per
    L2), by Kendall tau *out of fold* over the whole window (k folds: every row is scored by a fit
    that never saw it). A correction is taken only when it beats the shipped head by a margin of
    `margin_c / sqrt(rows)`, about a third of tau's standard error on that many rows: picking the
    best of several noisy scores flatters the winner, and a correction that merely ties would
    move the ranking at random. When none does, the shipped head serves again (a zero correction).
    Why not the old rule (fit on 4/5 of the window, swap in when the held-back fifth ranks at least
    as well as the head in use): on a stream of distinct prompts from an unseen source the fifth
    is 20-80 rows, whose tau moves by +-0.1 from row noise alone, so it swapped in corrections
    that ranked the next requests worse (down to -0.13 on a noisy chat source) and never took
    back a correction once it was in use."""

    L2 = (1.0, 10.0, 100.0, 1000.0)

    def __init__(self, base, window: int = RefreshConfig.window,
                 min_rows: int = RefreshConfig.min_rows, folds: int = 5, margin_c: float = 0.5):
        self.base = base
        self.rows: collections.deque[tuple[np.ndarray, float]] = collections.deque(maxlen=window)
        self.min_rows = min_rows
        self.folds = folds
        self.margin_c = margin_c
        self.fit = None  # (mean, std, coef, bias) of the correction in use; None: the base alone
        self.version = 0  # changes of the head in use
        self.rejected = 0  # refits whose best correction did not beat the shipped head
        self._refitting = threading.Lock()  # one refit at a time (never taken by predict)

    def observe(self, x: np.ndarray, true_length: int) -> None:
        """A finished request: its proxy features and its true output length."""
        if true_length > 0:
            self.rows.append((np.asarray(x, dtype=np.float32), float(np.log1p(true_length))))

    def adopt(self, fit, version: int) -> None:
        """Take a correction learned earlier (a previous run's, from its file) as the one in use."""
        self.fit, self.version = fit, version

    def predict_log(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=np.float32))
        base = self.base.predict_log(x)
        fit = self.fit  # one read: a swap in between changes nothing here
        return base if fit is None else base + correction(fit, x)

    def _ridge(self, x: np.ndarray, r: np.ndarray, l2: float):
        mean, std = x.mean(0), x.std(0) + 1e-6
        z = (x - mean) / std
        bias = float(r.mean())
        coef = np.linalg.solve(z.T @ z + l2 * len(z) ** 0.5 * np.eye(z.shape[1]), z.T @ (r - bias))
        return mean, std, coef.astype(np.float32), bias

    def _out_of_fold(self, x: np.ndarray, r: np.ndarray, base: np.ndarray, l2: float) -> np.ndarray:
        fold = np.arange(len(r)) % self.folds
        pred = np.empty(len(r))
        for k in range(self.folds):
            train = fold != k
            pred[~train] = base[~train] + correction(self._ridge(x[train], r[train], l2), x[~train])
        return pred

    def refit(self) -> bool:
        """Choose the shipped head or the best ridge correction by out-of-fold tau on the window;
        True when the head in use changed."""
        with self._refitting:
            rows = list(self.rows)
            if len(rows) < self.min_rows:
                return False
            x = np.stack([r[0] for r in rows])
            y = np.array([r[1] for r in rows])
            base = self.base.predict_log(x)
            bar = kendall_tau(base, y) + self.margin_c / len(rows) ** 0.5
            best_tau, best = bar, None
            for l2 in self.L2:
                tau = kendall_tau(self._out_of_fold(x, y - base, base, l2), y)
                if tau > best_tau:
                    best_tau, best = tau, l2
            if best is None:
                self.rejected += 1
                if self.fit is None or not np.any(self.fit[2]):
                    return False
                mean, std, coef, _ = self.fit
                self.fit = (mean, std, np.zeros_like(coef), 0.0)  # the shipped head again (a file can say so)
            else:
                self.fit = self._ridge(x, y - base, best)  # the chosen L2, refitted on every row
            self.version += 1
            return True


class LastColumn:
    """The base head as the llm sees it: the proxy's own log prediction, the features' last column."""

    def predict_log(self, x: np.ndarray) -> np.ndarray:
        return np.atleast_2d(x)[:, -1].astype(np.float64)


class CorrectionFile:
    """The refreshed correction on disk, shared by the llm (writes) and the length_predictor (reads)."""

    def __init__(self, path: Path, poll_s: float = 1.0):
        self.path, self.poll_s = Path(path), poll_s
        self._next_poll, self._mtime = 0.0, None
        self.fit, self.version = None, 0

    def write(self, fit, version: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.stem}.tmp{os.getpid()}.npz")
        mean, std, coef, bias = fit
        np.savez(tmp, mean=mean, std=std, coef=coef, bias=np.float64(bias), version=np.int64(version))
        os.replace(tmp, self.path)  # readers see the old file or the new one, never half of one

    def poll(self, dim: int) -> bool:
        """Reload when the file changed (at most every poll_s); True when a new correction was taken.
        A file for features of another width (another artifact) is ignored."""
        now = time.monotonic()
        if now < self._next_poll:
            return False
        self._next_poll = now + self.poll_s
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return False
        if mtime == self._mtime:
            return False
        try:
            with np.load(self.path) as data:
                fit = (data["mean"], data["std"], data["coef"], float(data["bias"]))
                version = int(data["version"])
        except Exception as exc:  # noqa: BLE001  a broken file leaves the correction in use
            self._mtime = mtime
            log.warning("proxy correction %s unreadable: %s", self.path, exc)
            return False
        if len(fit[0]) != dim:
            return False
        self._mtime = mtime
        self.fit, self.version = fit, version
        return True

    def apply(self, x: np.ndarray, base_log: np.ndarray) -> np.ndarray:
        fit = self.fit  # one read: a reload in between changes nothing here
        return base_log if fit is None else base_log + correction(fit, x)


class Refresher:
    """The llm side: finished requests' features and true lengths in, a refit every interval_s on a
    thread of its own, and the correction written out when one is swapped in."""

    def __init__(self, path: Path, window: int = RefreshConfig.window,
                 interval_s: float = RefreshConfig.interval_s,
                 min_rows: int = RefreshConfig.min_rows, on_refit=None):
        self.head = OnlineHead(LastColumn(), window=window, min_rows=min_rows)
        self.file = CorrectionFile(path)
        self.interval_s = interval_s
        self.on_refit = on_refit  # called with (swapped: bool, version) after each refit that ran
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ssjf-refresh", daemon=True)
        self._seen = 0

    def start(self) -> "Refresher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def observe(self, features, true_length: int) -> None:
        if features is not None and len(features) > 1:
            self.head.observe(features, true_length)
            self._seen += 1

    def refresh(self) -> bool:
        if self._seen == 0:
            return False
        self._seen = 0
        if self.head.version == 0 and self.head.rows and self.file.poll(len(self.head.rows[-1][0])):
            # the correction a previous run saved (the proxy serves it): the one to beat
            self.head.adopt(self.file.fit, self.file.version)
        if len(self.head.rows) < self.head.min_rows:
            return False
        swapped = self.head.refit()
        if swapped:
            self.file.write(self.head.fit, self.head.version)
        if self.on_refit is not None:
            self.on_refit(swapped, self.head.version)
        return swapped

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001  a failed refit keeps the head in use
                log.exception("proxy refresh failed")
