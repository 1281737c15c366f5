"""Locust users speaking Triton gRPC streaming to the `ssjf` ensemble.

Each request is reported twice: `ttft` (first token) and `jct` (final response), as
separate entries, both measured at the client. Settings (LoadSettings below) from the
environment as SSJF_LOAD_<NAME>, e.g.:

  locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 60s --host 127.0.0.1:8001
  SSJF_LOAD_RATE=1.0 locust -f loadtest/locustfile.py --headless -u 16 -r 16 -t 120s --host 127.0.0.1:8001
  SSJF_LOAD_SHAPE=azure SSJF_LOAD_AZURE_TRACE=azure_llm_trace_conv.csv locust -f loadtest/locustfile.py \
      --headless --host 127.0.0.1:8001
"""

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before anything opens a gRPC channel

import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from locust import LoadTestShape, User, between, events, task  # noqa: E402

from ssjf.config import load_settings  # noqa: E402
from ssjf_client import SSJFClient  # noqa: E402


@dataclass
class LoadSettings:
    model: str = "ssjf"  # the Triton model to call: ssjf (the ensemble) or llm
    prompts: str = ""  # JSON lines with `prompt` (and `response`); empty: a built-in set
    max_tokens: int = 64  # cap per request
    # 1: each prompt's recorded response length as max_tokens, with ignore_eos (to compare policies
    # that way, serve with SSJF_CAP_BY_MAX_TOKENS=0, or SSJF reads the true length)
    trace: bool = False
    rate: float = 0.0  # > 0: Poisson-like total requests/s over all users (exponential waits)
    shape: str = ""  # azure: users follow the Azure trace's arrival rate over time
    azure_trace: str = ""  # that trace's CSV
    time_scale: float = 60.0  # how much the trace's time is compressed
    peak_users: int = 32  # users at the trace's busiest minute
    system: str = ""  # set: every request is a conversation (`messages`) with this system prompt
    # priority classes: "0:0.2,1:0.8" sends 20% of requests in class 0 (served first), 80% in class 1
    priorities: str = ""


SETTINGS = load_settings(LoadSettings)
PRIORITIES = [(int(c), float(w)) for c, w in (p.split(":") for p in SETTINGS.priorities.split(",") if p)]

BUILTIN = ["What is the capital of France?", "Write a short poem about the sea.", "Explain TCP in one paragraph.",
           "Give three tips for better sleep.", "Translate 'good morning' into Spanish.", "What is 17 * 23?"]


def load_prompts():
    path = SETTINGS.prompts
    if not path:
        return [(p, None) for p in BUILTIN]
    from ssjf_tools.data import load_rows, response_lengths

    rows = list(load_rows(path))
    if SETTINGS.trace:
        return list(zip([r.prompt for r in rows], response_lengths(rows)))
    return [(r.prompt, None) for r in rows]


PROMPTS = load_prompts()


def _wait_time():
    rate = SETTINGS.rate
    if rate <= 0:
        return between(0.5, 1.5)

    def exponential(user):  # open-loop-like: arrivals thin out to a Poisson process over many users
        return random.expovariate(rate / max(1, user.environment.runner.user_count))

    return exponential


class SSJFUser(User):
    wait_time = _wait_time()

    def on_start(self):
        self.client = SSJFClient(self.host or "127.0.0.1:8001", SETTINGS.model)
        self.max_tokens = SETTINGS.max_tokens

    def on_stop(self):
        self.client.close()

    @task
    def generate(self):
        prompt, trace_len = random.choice(PROMPTS)
        start = time.time()
        LEDGER["sent"] += 1
        chat = {}
        if PRIORITIES:
            chat["priority"] = random.choices(*zip(*PRIORITIES))[0]
        if SETTINGS.system:
            chat = {"messages": [{"role": "system", "content": SETTINGS.system}, {"role": "user", "content": prompt}]}
            prompt = None
        if trace_len:
            r = self.client.generate(prompt, max_tokens=min(trace_len, self.max_tokens), ignore_eos=True, **chat)
        else:
            r = self.client.generate(prompt, max_tokens=self.max_tokens, **chat)
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
    from ssjf_tools.data import load_arrival_times

    stamps = load_arrival_times(path)
    start = stamps[0]
    counts: dict[int, int] = {}
    for t in stamps:
        counts[int((t - start) // window_s)] = counts.get(int((t - start) // window_s), 0) + 1
    peak = max(counts.values())
    steps = max(counts) + 1
    return [((i + 1) * window_s / time_scale, max(1, round(peak_users * counts.get(i, 0) / peak))) for i in range(steps)]


if SETTINGS.shape == "azure":

    class AzureTraceShape(LoadTestShape):
        """Users follow the Azure trace's per-minute arrival rate, time-compressed."""

        curve = azure_user_curve(SETTINGS.azure_trace, SETTINGS.time_scale, SETTINGS.peak_users)

        def tick(self):
            t = self.get_run_time()
            for end, users in self.curve:
                if t < end:
                    return users, max(1, users)
            return None
