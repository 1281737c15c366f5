"""Locust users speaking Triton gRPC streaming to the `ssjf` ensemble.

Each request is reported twice: `ttft` (first token) and `jct` (final response), as
separate entries, both measured at the client. Settings from the environment:
  SSJF_PROMPTS     JSON lines with `prompt` (and `response`); default: a built-in set
  SSJF_MAX_TOKENS  cap per request (default 64); with SSJF_TRACE=1 the recorded
                   response's token count is used instead, with ignore_eos
  SSJF_MODEL       ensemble name (default ssjf)

  locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 60s --host 127.0.0.1:8001
"""

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before anything opens a gRPC channel

import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

from locust import User, between, task  # noqa: E402

from ssjf_client import SSJFClient  # noqa: E402

BUILTIN = ["What is the capital of France?", "Write a short poem about the sea.", "Explain TCP in one paragraph.",
           "Give three tips for better sleep.", "Translate 'good morning' into Spanish.", "What is 17 * 23?"]


def load_prompts():
    path = os.environ.get("SSJF_PROMPTS")
    if not path:
        return [(p, None) for p in BUILTIN]
    from ssjf.data import load_rows

    rows = list(load_rows(path))
    if os.environ.get("SSJF_TRACE") == "1":
        from transformers import AutoTokenizer

        from ssjf.assets import resolve_llm

        tok = AutoTokenizer.from_pretrained(resolve_llm("smollm2"))
        return [(r.prompt, r.length or max(1, len(tok.encode(r.response or "", add_special_tokens=False))))
                for r in rows]
    return [(r.prompt, None) for r in rows]


PROMPTS = load_prompts()


class SSJFUser(User):
    wait_time = between(0.5, 1.5)

    def on_start(self):
        self.client = SSJFClient(self.host or "127.0.0.1:8001", os.environ.get("SSJF_MODEL", "ssjf"))
        self.max_tokens = int(os.environ.get("SSJF_MAX_TOKENS", "64"))

    def on_stop(self):
        self.client.close()

    @task
    def generate(self):
        prompt, trace_len = random.choice(PROMPTS)
        start = time.time()
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
