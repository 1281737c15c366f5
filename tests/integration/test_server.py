"""The ensemble through a real tritonserver: gRPC streaming, HTTP generate and generate_stream,
concurrency, and a client that goes away mid-stream."""

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient

from ssjf.server import is_ready
from ssjf_client import SSJFClient
from ssjf_client.client import build_inputs


def post(url, body, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def test_grpc_stream_through_the_ensemble(server):
    with SSJFClient(server.grpc_url) as client:
        pieces = []
        r = client.generate("What is the capital of France?", max_tokens=16, ignore_eos=True, on_text=pieces.append)
    assert r.ok, r.error
    assert r.chunks > 1 and "".join(pieces) == r.text and "Paris" in r.text
    assert r.predicted_length is not None and r.predicted_length >= 1
    assert 0 < r.ttft_s <= r.jct_s


def test_grpc_non_streaming_gets_one_response(server):
    with SSJFClient(server.grpc_url) as client:
        r = client.generate("Name a fruit.", max_tokens=12, ignore_eos=True, stream=False)
    assert r.ok and r.chunks == 1 and r.text


def test_http_generate_returns_one_response_with_predicted_length(server):
    with post(f"{server.http_url}/v2/models/ssjf/generate", {"text_input": "Say hello.", "max_tokens": 8}) as resp:
        body = json.loads(resp.read())
    assert isinstance(body["text_output"], str) and body["text_output"]
    assert isinstance(body["predicted_length"], int) and body["predicted_length"] >= 1


def test_http_generate_stream_sends_a_response_per_token(server):
    body = {"text_input": "Count from one to ten.", "max_tokens": 12, "ignore_eos": True, "stream": True}
    events = []
    with post(f"{server.http_url}/v2/models/ssjf/generate_stream", body) as resp:
        for line in resp:
            line = line.decode().strip()
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert len(events) > 1
    assert all("error" not in e for e in events)
    assert "".join(e["text_output"] for e in events).strip()


def test_many_concurrent_streams_all_finish(server):
    n = 12
    results = [None] * n

    def run(i):
        with SSJFClient(server.grpc_url) as client:
            results[i] = client.generate(f"Tell me fact number {i} about space.", max_tokens=8 + 2 * i,
                                         ignore_eos=True, timeout=180)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(200)
    assert all(r is not None and r.ok for r in results), [r and r.error for r in results]
    assert all(r.chunks >= 1 and r.jct_s > 0 for r in results)


def test_direct_llm_model_streams_without_a_prediction(server):
    with SSJFClient(server.grpc_url, model="llm") as client:
        r = client.generate("Hi!", max_tokens=6, ignore_eos=True)
    assert r.ok and r.chunks >= 1 and r.predicted_length == 0


def _abandon_stream(server, model):
    """Start a long stream, read one response, then drop the client (cancel + close)."""
    got_one = threading.Event()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: got_one.set())
    client.async_stream_infer(model, build_inputs("Write a very long essay about rivers.", max_tokens=400,
                                                  ignore_eos=True))
    assert got_one.wait(60)
    client.stop_stream(cancel_requests=True)
    client.close()


def test_server_still_answers_after_a_client_goes_away_mid_stream(server):
    for model in ("llm", "ssjf"):
        _abandon_stream(server, model)
        with SSJFClient(server.grpc_url) as client:
            r = client.generate("Are you still there?", max_tokens=8, ignore_eos=True, timeout=120)
        assert r.ok, r.error
    assert is_ready(server.http_url)


def test_cancelled_direct_stream_frees_the_engine(server):
    """A cancelled llm stream stops generating: a later request is not stuck behind 400 tokens."""
    _abandon_stream(server, "llm")
    start = time.perf_counter()
    with SSJFClient(server.grpc_url, model="llm") as client:
        r = client.generate("Quick one.", max_tokens=4, ignore_eos=True, timeout=120)
    assert r.ok
    # 400 tokens at batch 1 take well over 2 s here; a freed slot answers at once
    assert time.perf_counter() - start < 2.0


def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(server):
    with SSJFClient(server.grpc_url) as client:
        r = client.generate("   ", max_tokens=8)
        assert not r.ok and "text_input" in r.error
        r = client.generate("hi", max_tokens=100000)
        assert not r.ok and "max_tokens" in r.error
        r = client.generate("Still fine?", max_tokens=4, ignore_eos=True)
        assert r.ok
    try:
        post(f"{server.http_url}/v2/models/ssjf/generate", {"text_input": "hi", "temperature": -1.0})
        raise AssertionError("expected an HTTP error")
    except urllib.error.HTTPError as exc:
        assert "temperature" in exc.read().decode()
    assert is_ready(server.http_url)


def test_predicted_length_orders_the_llm_queue(server):
    """Through the real server with batch slots busy, SSJF serves the shorter predicted job first."""
    inputs = lambda text, pred: build_inputs(text, max_tokens=20, ignore_eos=True) + [_pred(pred)]  # noqa: E731
    order = []
    lock = threading.Lock()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    done = threading.Event()

    def callback(result, error):
        if error is None and result.get_response().parameters["triton_final_response"].bool_param:
            with lock:
                order.append(result.get_response().id)
                if len(order) == 3 + 16:
                    done.set()

    client.start_stream(callback=callback)
    # fill every slot (16) with jobs that end a few steps apart, so slots free one at a time
    # and each queued job is admitted alone, in the policy's order
    for i in range(16):
        client.async_stream_infer("llm", build_inputs("Fill.", max_tokens=30 + 4 * i, ignore_eos=True),
                                  request_id=f"fill{i}", enable_empty_final_response=True)
    time.sleep(0.5)
    client.async_stream_infer("llm", inputs("long job", 900), request_id="long", enable_empty_final_response=True)
    client.async_stream_infer("llm", inputs("mid job", 300), request_id="mid", enable_empty_final_response=True)
    client.async_stream_infer("llm", inputs("short job", 3), request_id="short", enable_empty_final_response=True)
    assert done.wait(180)
    client.stop_stream()
    client.close()
    queued = [rid for rid in order if not rid.startswith("fill")]
    assert queued == ["short", "mid", "long"], order


def _pred(value):
    t = grpcclient.InferInput("predicted_length", [1, 1], "INT32")
    t.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return t


def _metrics(server):
    with urllib.request.urlopen(f"http://127.0.0.1:{server.config.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("ssjf_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_move_with_traffic(server):
    before = _metrics(server)
    with SSJFClient(server.grpc_url) as client:
        assert client.generate("Metrics please.", max_tokens=5, ignore_eos=True).ok
        assert not client.generate("", max_tokens=5).ok  # a rejection
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # metric updates follow the final send
        after = _metrics(server)
        if after.get('ssjf_jct_seconds_count{policy="ssjf"}', 0) > before.get('ssjf_jct_seconds_count{policy="ssjf"}', 0):
            break
        time.sleep(0.1)
    key = lambda name: next(k for k in after if k.startswith(name))  # noqa: E731
    assert after[key("ssjf_generated_tokens_total")] >= before.get(key("ssjf_generated_tokens_total"), 0) + 5
    assert after['ssjf_ttft_seconds_count{policy="ssjf"}'] > before.get('ssjf_ttft_seconds_count{policy="ssjf"}', 0)
    assert after['ssjf_length_error_tokens_count{policy="ssjf"}'] >= 1
    rejected = [k for k in after if k.startswith("ssjf_rejections_total") and 'field="text_input"' in k]
    assert rejected and after[rejected[0]] >= 1
    assert any(k.startswith("ssjf_queue_depth") for k in after)
    assert any(k.startswith("ssjf_running_batch") for k in after)


def test_admin_apis_need_the_key_and_inference_does_not(server):
    url = f"{server.http_url}/v2/repository/index"
    try:
        post(url, {})
        raise AssertionError("the model-repository API answered without the admin key")
    except urllib.error.HTTPError as exc:
        assert exc.code in (401, 403)
    req = urllib.request.Request(url, data=b"{}", headers={"ssjf-admin-key": server.config.admin_key})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert {m["name"] for m in json.loads(resp.read())} >= {"ssjf", "llm", "length_predictor"}
    assert is_ready(server.http_url)
