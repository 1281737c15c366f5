"""Serving metrics: hooks the engine calls, and their Prometheus families in Triton.

`Metrics` records nothing (tests, benchmarks); `TritonMetrics` publishes through
`pb_utils.MetricFamily` on Triton's /metrics endpoint, every family labelled by policy.
Each update is an IPC round trip in Triton's stub, so the updates run through `run` (the
responder's queue, off the engine thread) and gauges are set only when they change.
`RankWindow` keeps the last N finished requests' (predicted, true) lengths and says how well the
predictions rank them (Kendall tau) and size them (MAE): the live view of the proxy on this
traffic (and ssrpt's check that the predictions are worth preempting on).
Server-side times start when execute() receives the request.
"""

from __future__ import annotations

import collections

import numpy as np
from scipy import stats

from .request import Request

TIME_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250]
ERROR_BUCKETS = [-1024, -512, -256, -128, -64, -32, -16, 0, 16, 32, 64, 128, 256, 512, 1024]


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
        pred, true = zip(*self.pairs) if self.pairs else ((), ())
        return kendall_tau(pred, true)

    def mae_tokens(self) -> float:
        if not self.pairs:
            return 0.0
        a = np.asarray(self.pairs, dtype=np.float64)
        return float(np.mean(np.abs(a[:, 0] - a[:, 1])))


class Metrics:
    """The engine's metric hooks; this base records nothing."""

    def step(self, waiting: int, running: int, new_tokens: int) -> None: ...

    def first_token(self, req: Request) -> None: ...

    def finished(self, req: Request) -> None: ...

    def rejected(self, reason: str) -> None: ...

    def preempted(self, req: Request) -> None: ...

    def recomputed(self, tokens: int) -> None: ...

    def queued_work(self, tokens: int) -> None: ...

    def proxy_fallback(self) -> None: ...

    def refit(self, swapped: bool, version: int) -> None: ...


class TritonMetrics(Metrics):
    def __init__(self, pb_utils, policy: str, run=None, rank_window: int = 500, rank_every: int = 16):
        self._run = run or (lambda fn, *args: fn(*args))  # where updates execute
        self._last_gauges = None
        mf = pb_utils.MetricFamily
        labels = {"policy": policy}
        # the families must stay alive as long as their metrics: keep them on self
        self.families = {
            "queue": mf("ssjf_queue_depth", "Requests waiting in the LLM queue", mf.GAUGE),
            "running": mf("ssjf_running_batch", "Requests in the running batch", mf.GAUGE),
            "tokens": mf("ssjf_generated_tokens_total", "Output tokens generated", mf.COUNTER),
            "requests": mf("ssjf_requests_total", "Requests ended, by status", mf.COUNTER),
            "rejected": mf("ssjf_rejections_total", "Requests rejected before queueing, by field", mf.COUNTER),
            "fallback": mf("ssjf_proxy_fallbacks_total", "Requests queued without a length prediction", mf.COUNTER),
            "ttft": mf("ssjf_ttft_seconds", "Server-side time to first token", mf.HISTOGRAM),
            "jct": mf("ssjf_jct_seconds", "Server-side job completion time", mf.HISTOGRAM),
            "error": mf("ssjf_length_error_tokens", "Predicted minus actual output length", mf.HISTOGRAM),
            "tau": mf("ssjf_proxy_kendall_tau", "Kendall tau of predicted vs true lengths, last finished requests",
                      mf.GAUGE),
            "mae": mf("ssjf_proxy_mae_tokens", "Mean absolute length error in tokens, last finished requests", mf.GAUGE),
            "ranked": mf("ssjf_proxy_window_requests", "Finished requests the rank gauges are over", mf.GAUGE),
            "version": mf("ssjf_proxy_head_version", "Proxy corrections learned from traffic and swapped in", mf.GAUGE),
            "refits": mf("ssjf_proxy_refits_total", "Proxy refits, by result (swapped, kept)", mf.COUNTER),
            "preemptions": mf("ssjf_preemptions_total", "Running requests that gave their batch place back (ssrpt)",
                              mf.COUNTER),
            "recomputed": mf("ssjf_recomputed_tokens_total", "Prompt and generated tokens prefilled again after a "
                             "preemption", mf.COUNTER),
            "remaining": mf("ssjf_remaining_error_tokens", "At each preemption, the preempted request's expected "
                            "remaining length minus the remainder it then generated (ssrpt)", mf.HISTOGRAM),
            "work": mf("ssjf_queued_work_tokens", "Predicted tokens still to generate: waiting requests' predicted "
                       "lengths plus running ones' predicted remainders (for routing by work)", mf.GAUGE),
        }
        f = self.families
        self.queue = f["queue"].Metric(labels=labels)
        self.running = f["running"].Metric(labels=labels)
        self.tokens = f["tokens"].Metric(labels=labels)
        self.fallbacks = f["fallback"].Metric(labels=labels)
        self.ttft = f["ttft"].Metric(labels=labels, buckets=TIME_BUCKETS)
        self.jct = f["jct"].Metric(labels=labels, buckets=TIME_BUCKETS)
        self.error = f["error"].Metric(labels=labels, buckets=ERROR_BUCKETS)
        self.remaining = f["remaining"].Metric(labels=labels, buckets=ERROR_BUCKETS)
        self.tau, self.mae, self.ranked, self.version = (f[k].Metric(labels=labels)
                                                         for k in ("tau", "mae", "ranked", "version"))
        self.preemptions = f["preemptions"].Metric(labels=labels)
        self.recomputed_tokens = f["recomputed"].Metric(labels=labels)
        self.work = f["work"].Metric(labels=labels)
        self.window = RankWindow(rank_window)
        self._rank_every, self._since_rank = rank_every, 0
        self._policy = policy
        self._by_label: dict[tuple[str, str], object] = {}

    def _counter(self, family: str, key: str, value: str):
        metric = self._by_label.get((family, value))
        if metric is None:
            metric = self.families[family].Metric(labels={"policy": self._policy, key: value})
            self._by_label[(family, value)] = metric
        return metric

    def step(self, waiting: int, running: int, new_tokens: int) -> None:
        if (waiting, running) != self._last_gauges:
            self._last_gauges = (waiting, running)
            self._run(self._set_gauges, waiting, running)
        if new_tokens:
            self._run(self.tokens.increment, new_tokens)

    def _set_gauges(self, waiting: int, running: int) -> None:
        self.queue.set(waiting)
        self.running.set(running)

    def first_token(self, req: Request) -> None:
        self._run(self.ttft.observe, req.first_token_time - req.arrival_time)

    def finished(self, req: Request) -> None:
        self._run(self._counter("requests", "status", req.status.value).increment, 1)
        self._run(self.jct.observe, req.finish_time - req.arrival_time)
        if req.predicted_length is not None and req.finish_reason in ("stop", "length"):
            self._run(self.error.observe, req.predicted_length - len(req.output_ids))
            self._run(self._rank, req.predicted_length, len(req.output_ids))
        if req.finish_reason in ("stop", "length"):
            for done, expected in req.preempted_at:
                self._run(self.remaining.observe, expected - (len(req.output_ids) - done))

    def _rank(self, predicted: int, true: int) -> None:
        """On the responder's thread: the window and, every rank_every requests, its tau and MAE."""
        self.window.add(predicted, true)
        self._since_rank += 1
        if self._since_rank >= self._rank_every:
            self._since_rank = 0
            self.tau.set(self.window.kendall_tau())
            self.mae.set(self.window.mae_tokens())
            self.ranked.set(len(self.window))

    def rejected(self, reason: str) -> None:
        self._run(self._counter("rejected", "field", reason).increment, 1)

    def refit(self, swapped: bool, version: int) -> None:
        """The proxy refresh ran a refit (from its own thread)."""
        self._run(self._counter("refits", "result", "swapped" if swapped else "kept").increment, 1)
        self._run(self.version.set, version)

    def proxy_fallback(self) -> None:
        self._run(self.fallbacks.increment, 1)

    def preempted(self, req: Request) -> None:
        self._run(self.preemptions.increment, 1)

    def recomputed(self, tokens: int) -> None:
        self._run(self.recomputed_tokens.increment, tokens)

    def queued_work(self, tokens: int) -> None:
        self._run(self.work.set, tokens)

    def close(self) -> None:
        """Free Triton's metric objects now, from finalize(): left to the interpreter's exit they
        are freed after the stub's shared memory is gone, and the stub crashes."""
        import gc

        metric = type(self.queue)  # Triton's Metric class: every attribute of it goes
        self.__dict__.update({name: None for name, value in vars(self).items() if isinstance(value, metric)})
        self._by_label.clear()
        self.families.clear()
        gc.collect()
