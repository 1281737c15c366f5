"""`ssjf serve` as an operator runs it (a child process on free ports): the HTTP gate keeps what
Triton 2.51's front end cannot survive away from it, a killed stub is noticed and the server
replaced, and SIGTERM drains in-flight requests and exits cleanly."""

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ssjf.config import free_ports
from ssjf.server import is_ready, is_running, stub_processes
from ssjf_client import SSJFClient

KEY = "test-admin-key"


class Served:
    """`ssjf serve` in a child process, its output in a log file."""

    def __init__(self, root: Path, drain_s: int = 10, **extra_env):
        self.http, self.grpc, self.metrics, self.openai = free_ports(4)
        self.log = root / "serve.log"
        key_file = root / "admin.key"
        key_file.write_text(KEY + "\n")
        env = dict(os.environ, HTTP_PORT=str(self.http), GRPC_PORT=str(self.grpc), METRICS_PORT=str(self.metrics),
                   OPENAI_PORT=str(self.openai),
                   SSJF_DRAIN_S=str(drain_s), SSJF_ADMIN_KEY_FILE=str(key_file), SSJF_PROXY_REFRESH="0",
                   SSJF_MAX_BATCH_SIZE="16", **extra_env)
        env.pop("SSJF_ADMIN_KEY", None)
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "ssjf"), "serve"], env=env,
                                     stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.http}"
        self.grpc_url = f"127.0.0.1:{self.grpc}"

    def wait_ready(self, timeout: float = 300) -> float:
        start = time.monotonic()
        while not is_ready(self.url):
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() - start < timeout, f"not ready in {timeout}s"
            time.sleep(0.25)
        return time.monotonic() - start

    def tritonserver(self) -> int:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", "tritonserver"], capture_output=True, text=True)
        return int(out.stdout.split()[0])

    def processes(self) -> list[int]:
        """tritonserver and its stubs."""
        triton = self.tritonserver()
        return [triton, *stub_processes(triton)]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    # the torch runner: supervision does not depend on the runner, and it restarts in seconds where
    # the vllm runner takes about a minute (64-68 s measured with it: docs/robustness.md)
    srv = Served(Path(tmp_path_factory.mktemp("served")), SSJF_RUNNER="torch")
    srv.wait_ready()
    yield srv
    srv.stop()


def request(url, body: bytes, headers=None, timeout=30):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_streams(grpc_url, lengths):
    """One thread per request; results[i] = (ok, error, seconds from start to its end)."""
    results = {}

    def run(i, n):
        with SSJFClient(grpc_url) as client:
            start = time.monotonic()
            r = client.generate(f"Tell me a long story, number {i}.", max_tokens=n, ignore_eos=True, timeout=300)
            results[i] = (r.ok, r.error, time.monotonic() - start, time.monotonic())

    threads = [threading.Thread(target=run, args=(i, n)) for i, n in enumerate(lengths)]
    for t in threads:
        t.start()
    return results, threads


def test_the_gate_refuses_what_would_kill_or_bloat_triton_and_passes_the_rest(served):
    generate = f"{served.url}/v2/models/ssjf/generate"
    deep = b'{"text_input": ' + b"[" * 400_000 + b"]" * 400_000 + b', "max_tokens": 8}'  # segfaults Triton 2.51
    status, body = request(generate, deep)
    assert status == 400 and b"nested deeper than" in body
    bomb = gzip.compress(json.dumps({"text_input": "a" * (64 << 20), "max_tokens": 1}).encode())
    status, body = request(f"{served.url}/v2/models/length_predictor/infer", bomb, {"Content-Encoding": "gzip"})
    assert status == 415, body
    status, body = request(generate, b'{"text_input": "' + b"a" * (2 << 20) + b'"}')
    assert status == 413, body
    status, body = request(f"{served.url}/v2/models/llm/generate", b'{"text_input": "hi", "max_tokens": 2}')
    assert status == 403 and b"internal" in body
    status, body = request(f"{served.url}/v2/models/llm/generate", b'{"text_input": "hi", "max_tokens": 2}',
                           {"ssjf-admin-key": KEY})
    assert status == 200, body  # the operator, with the key, still reaches it
    status, body = request(generate, b'{"text_input": "Say hello.", "max_tokens": 4}')
    assert status == 200 and json.loads(body)["text_output"]
    events = []
    req = urllib.request.Request(f"{served.url}/v2/models/ssjf/generate_stream",
                                 data=b'{"text_input": "Count to five.", "max_tokens": 8, "ignore_eos": true, "stream": true}')
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [json.loads(line[5:]) for line in r if line.startswith(b"data:")]
    assert len(events) > 1 and all("error" not in e for e in events)
    assert is_ready(served.url)


def test_a_killed_stub_ends_its_streams_and_the_server_comes_back(served):
    results, threads = start_streams(served.grpc_url, [600] * 8)
    time.sleep(3)
    stubs = stub_processes(served.tritonserver())
    llm = next(pid for pid, model in stubs.items() if model == "llm")
    killed = time.monotonic()
    os.kill(llm, signal.SIGKILL)
    not_ready_at = ready_at = None
    hung = 0
    while ready_at is None and time.monotonic() - killed < 180:
        try:
            with urllib.request.urlopen(f"{served.url}/v2/health/ready", timeout=2) as r:
                up = r.status == 200
        except urllib.error.HTTPError:
            up = False
        except (socket.timeout, TimeoutError):
            hung += 1
            up = False
        except urllib.error.URLError as e:
            hung += isinstance(e.reason, (socket.timeout, TimeoutError))
            up = False
        if not up and not_ready_at is None:
            not_ready_at = time.monotonic() - killed
        if up and not_ready_at is not None:
            ready_at = time.monotonic() - killed
        time.sleep(0.2)
    for t in threads:
        t.join(30)
    ended = [results[i][3] - killed for i in range(8)]
    print(f"killed llm stub: 8 streams ended within {max(ended):.1f}s; not ready after {not_ready_at:.2f}s; "
          f"serving again after {ready_at:.0f}s; hung probes {hung}")
    assert all(not results[i][0] and results[i][1] for i in range(8)), results
    assert max(ended) < 10
    assert not_ready_at < 5 and ready_at is not None and ready_at < 120 and hung == 0
    with SSJFClient(served.grpc_url) as client:
        r = client.generate("Say hi.", max_tokens=4, timeout=60)
    assert r.ok, r.error
    log = served.log.read_text()  # tritonserver sometimes aborts by itself when a stub dies mid-IPC
    assert "the Python stub of llm" in log or "tritonserver exited with" in log


def test_a_killed_supervisor_leaves_no_tritonserver_behind(tmp_path):
    """kill -9 of `ssjf serve` itself: tritonserver (its own session) dies with it, and its stubs."""
    srv = Served(tmp_path, SSJF_RUNNER="torch")
    try:
        srv.wait_ready()
        processes = srv.processes()
        assert len(processes) == 3
        srv.proc.kill()
        srv.proc.wait()
        deadline = time.monotonic() + 30
        while any(is_running(pid) for pid in processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [pid for pid in processes if is_running(pid)] == []
    finally:
        srv.stop()


def openai_client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{served.openai}/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_chat_and_completions_streamed_and_not(served):
    client = openai_client(served)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Name a color."}],
                                       max_tokens=8, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens > 3 and 1 <= r.usage.completion_tokens <= 9
    pieces, usage = [], None
    for chunk in client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Count to 5."}],
                                                max_completion_tokens=12, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert len(pieces) > 1 and usage is not None and usage.completion_tokens >= 1
    c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert c.choices[0].text and c.usage.prompt_tokens >= 5
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0, stream=True) if ch.choices)
    assert streamed == c.choices[0].text  # greedy: the same text either way
    cut = client.completions.create(model="smollm2", prompt="List: a, b, c, d,", max_tokens=20, stop=[","],
                                    extra_body={"ignore_eos": True})
    assert "," not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"


def test_openai_errors_name_the_field(served):
    import openai

    client = openai_client(served)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    assert bad.value.status_code == 400 and "max_tokens" in str(bad.value)
    with pytest.raises(openai.BadRequestError, match="n: not supported"):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="smollm2", prompt="hi", temperature=-1)
    status, body = request(f"http://127.0.0.1:{served.openai}/v1/completions", b"[" * 100_000)
    assert status == 400 and b"not valid JSON" in body


def test_sigterm_drains_what_can_finish_and_exits_cleanly(served):
    """Runs last (it stops the module's server): 4 requests that finish within the 10 s drain, 4 that
    cannot; SIGTERM: readiness false at once, new requests refused, the 4 short ones complete, the
    4 long ones end with a shutting-down error, exit code 0, nothing left running, no crash logged."""
    results, threads = start_streams(served.grpc_url, [96] * 4 + [1500] * 4)
    time.sleep(1.5)
    processes = served.processes()
    assert len(processes) == 3
    logged_before = served.log.stat().st_size  # the killed-stub test above may have logged an abort
    term = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert not is_ready(served.url)
    with SSJFClient(served.grpc_url) as client:
        late = client.generate("Too late.", max_tokens=4, timeout=30)
    assert not late.ok and ("stopping" in late.error or "shutting down" in late.error), late.error
    for t in threads:
        t.join(60)
    code = served.proc.wait(60)
    took = time.monotonic() - term
    print(f"SIGTERM with 8 in flight: exit {code} after {took:.1f}s; {results}")
    assert all(results[i][0] and results[i][3] > term for i in range(4)), results  # in flight at the SIGTERM
    assert all(not results[i][0] and "shutting down" in results[i][1] for i in range(4, 8)), results
    assert code == 0 and took < 10 + 20
    assert [pid for pid in processes if is_running(pid)] == []
    with open(served.log, "rb") as f:
        f.seek(logged_before)
        log = f.read().decode(errors="replace")
    for crash in ("Segfault", "malloc()", "Signal (6)", "Signal (11)", "Exit timeout expired"):
        assert crash not in log, crash
