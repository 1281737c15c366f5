"""Locust users speaking Triton gRPC streaming to the `ssjf` ensemble.

Each request is reported twice: `ttft` (first token) and `jct` (final response), as
separate entries, both measured at the client. Settings from the environment:
  SSJF_PROMPTS     JSON lines with `prompt` (and `response`); default: a built-in set
  SSJF_MAX_TOKENS  cap per request (default 64); with SSJF_TRACE=1 the recorded
                   response's token count is used instead, with ignore_eos (to compare
                   policies that way, serve with SSJF_CAP_BY_MAX_TOKENS=0: max_tokens is then
                   the true length, and SSJF must not read it)
  SSJF_MODEL       ensemble name (default ssjf)
  SSJF_RATE        steady Poisson-like load: total requests/s over all users (each user
                   waits an exponential time with mean users / rate between requests)
  SSJF_SHAPE=azure replay the Azure trace's arrival rate over time (SSJF_AZURE_TRACE, the
                   CSV; SSJF_TIME_SCALE compresses its time, default 60; SSJF_PEAK_USERS
                   is the user count at the trace's busiest minute, default 32)

  locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 60s --host 127.0.0.1:8001
  SSJF_RATE=1.0 locust -f loadtest/locustfile.py --headless -u 16 -r 16 -t 120s --host 127.0.0.1:8001
  SSJF_SHAPE=azure SSJF_AZURE_TRACE=azure_llm_trace_conv.csv locust -f loadtest/locustfile.py \
      --headless --host 127.0.0.1:8001
"""

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before anything opens a gRPC channel

import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

from locust import LoadTestShape, User, between, events, task  # noqa: E402

from ssjf_client import SSJFClient  # noqa: E402

BUILTIN = ["What is the capital of France?", "Write a short poem about the sea.", "Explain TCP in one paragraph.",
           "Give three tips for better sleep.", "Translate 'good morning' into Spanish.", "What is 17 * 23?"]


def load_prompts():
    path = os.environ.get("SSJF_PROMPTS")
    if not path:
        return [(p, None) for p in BUILTIN]
    from ssjf.data import load_rows, response_lengths

    rows = list(load_rows(path))
    if os.environ.get("SSJF_TRACE") == "1":
        return list(zip([r.prompt for r in rows], response_lengths(rows)))
    return [(r.prompt, None) for r in rows]


PROMPTS = load_prompts()


def _wait_time():
    rate = float(os.environ.get("SSJF_RATE", "0"))
    if rate <= 0:
        return between(0.5, 1.5)

    def exponential(user):  # open-loop-like: arrivals thin out to a Poisson process over many users
        return random.expovariate(rate / max(1, user.environment.runner.user_count))

    return exponential


class SSJFUser(User):
    wait_time = _wait_time()

    def on_start(self):
        self.client = SSJFClient(self.host or "127.0.0.1:8001", os.environ.get("SSJF_MODEL", "ssjf"))
        self.max_tokens = int(os.environ.get("SSJF_MAX_TOKENS", "64"))

    def on_stop(self):
        self.client.close()

    @task
    def generate(self):
        prompt, trace_len = random.choice(PROMPTS)
        start = time.time()
        LEDGER["sent"] += 1
        if trace_len:
            r = self.client.generate(prompt, max_tokens=min(trace_len, self.max_tokens), ignore_eos=True)
        else:
            r = self.client.generate(prompt, max_tokens=self.max_tokens)
        fire = self.environment.events.request.fire
        error = None if r.ok else RuntimeError(r.error)
        fire(request_type="grpc", name="ttft", response_time=(r.ttft_s or r.jct_s or 0) * 1000,
             response_length=0, exception=error, start_time=start)
        fire(request_type="grpc", name="jct", response_time=(r.jct_s or 0) * 1000,
             response_length=len(r.text), exception=error, start_time=start)
        if r.ok:
            LEDGER["ok"] += 1
        else:
            LEDGER["errors"][r.error] = LEDGER["errors"].get(r.error, 0) + 1


# Every request sent, and how it ended: a final response (ok) or an error, by message. A request
# sent but never answered was cut off at stop (see --stop-timeout) or hung.
LEDGER: dict = {"sent": 0, "ok": 0, "errors": {}}


@events.quitting.add_listener
def _report_ledger(environment, **kw):
    print("ssjf-ledger " + json.dumps(LEDGER), flush=True)  # one line `ssjf soak` parses


def azure_user_curve(path: str, time_scale: float, peak_users: int, window_s: float = 60.0) -> list[tuple[float, int]]:
    """(end of step in seconds, users) following the trace's arrivals per window, time-compressed."""
    from ssjf.data import load_arrival_times

    stamps = load_arrival_times(path)
    start = stamps[0]
    counts: dict[int, int] = {}
    for t in stamps:
        counts[int((t - start) // window_s)] = counts.get(int((t - start) // window_s), 0) + 1
    peak = max(counts.values())
    steps = max(counts) + 1
    return [((i + 1) * window_s / time_scale, max(1, round(peak_users * counts.get(i, 0) / peak))) for i in range(steps)]


if os.environ.get("SSJF_SHAPE") == "azure":

    class AzureTraceShape(LoadTestShape):
        """Users follow the Azure trace's per-minute arrival rate, time-compressed."""

        curve = azure_user_curve(os.environ["SSJF_AZURE_TRACE"], float(os.environ.get("SSJF_TIME_SCALE", "60")),
                                 int(os.environ.get("SSJF_PEAK_USERS", "32")))

        def tick(self):
            t = self.get_run_time()
            for end, users in self.curve:
                if t < end:
                    return users, max(1, users)
            return None
