"""The ensemble through a real tritonserver: gRPC streaming, HTTP generate and generate_stream,
concurrency, and a client that goes away mid-stream."""

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from ssjf.server import is_ready
from ssjf_client import SSJFClient
from ssjf_client.client import build_inputs, scrape_metrics


def post(url, body, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=timeout)


def test_grpc_stream_through_the_ensemble(server):
    with SSJFClient(server.grpc_url) as client:
        pieces = []
        # greedy "The" leads "L" by 0.1 nats on the bare question, so bf16 kernels of one CPU or another
        # answer in French; asked for a sentence, every token up to Paris leads by 1.5 nats or more
        r = client.generate("What is the capital of France? Answer in one sentence.", max_tokens=16, ignore_eos=True,
                            on_text=pieces.append)
    assert r.ok, r.error
    assert r.chunks > 1 and "".join(pieces) == r.text and "Paris" in r.text
    assert r.predicted_length is not None and r.predicted_length >= 1
    assert 0 < r.ttft_s <= r.jct_s


def test_a_stop_string_ends_the_answer_through_the_ensemble_over_grpc_and_http(server):
    prompt = "What is the capital of France? Answer in one sentence."
    with SSJFClient(server.grpc_url) as client:
        full = client.generate(prompt, max_tokens=16, ignore_eos=True)
        pieces = []
        cut = client.generate(prompt, max_tokens=16, ignore_eos=True, stop=["Paris", "never"], on_text=pieces.append)
    assert full.ok and cut.ok, (full.error, cut.error)
    assert "Paris" in full.text and cut.text == full.text[: full.text.index("Paris")] and "".join(pieces) == cut.text
    # the outputs vllm_backend adds on request: why it ended, and the tokens the responses covered
    assert (full.finish_reason, full.output_tokens, cut.finish_reason) == ("length", 16, "stop")
    assert 1 <= cut.output_tokens < 16
    body = {"text_input": prompt, "max_tokens": 16, "ignore_eos": True, "stop": ["Paris"]}
    with post(f"{server.http_url}/v2/models/ssjf/generate", body) as resp:
        assert json.loads(resp.read())["text_output"] == cut.text


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


def test_a_conversation_goes_through_the_ensemble_over_grpc_and_http(server):
    turns = [{"role": "system", "content": "Answer with the city only."},
             {"role": "user", "content": "What is the capital of France?"}]
    with SSJFClient(server.grpc_url) as client:
        r = client.generate(None, max_tokens=8, messages=turns)
        bad = client.generate(None, max_tokens=8, messages=[{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}])
    assert r.ok, r.error
    assert "Paris" in r.text and r.predicted_length >= 1
    assert not bad.ok and "messages: the last turn must be the user's" in bad.error
    with post(f"{server.http_url}/v2/models/ssjf/generate", {"messages": json.dumps(turns), "max_tokens": 8}) as resp:
        assert "Paris" in json.loads(resp.read())["text_output"]


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


def _grpc_error(server, model, inputs, parameters=None):
    """Send raw tensors over a gRPC stream; the error text of the final response (None if it succeeded)."""
    got = []
    done = threading.Event()

    def callback(result, error):
        if error is not None:
            got.append(error.message())
            done.set()
        elif result.get_response().parameters["triton_final_response"].bool_param:
            done.set()

    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=callback)
    try:
        try:
            client.async_stream_infer(model, inputs, parameters=parameters, enable_empty_final_response=True)
        except Exception as exc:  # rejected by the client library before it left
            return str(exc)
        assert done.wait(30), "no final response"
        return got[0] if got else None
    finally:
        client.stop_stream()
        client.close()


def _tensor(name, array, triton_type):
    t = grpcclient.InferInput(name, list(array.shape), triton_type)
    t.set_data_from_numpy(array)
    return t


def _http_error(server, model, body: bytes):
    req = urllib.request.Request(f"{server.http_url}/v2/models/{model}/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req, timeout=30).read()
        return None
    except urllib.error.HTTPError as exc:
        return exc.read().decode()


def test_every_bad_input_gets_a_clear_error_fast_and_nothing_else_is_disturbed(server):
    """Issue 5's list, in a row against one server, while a long stream runs beside them: each case
    answers an error naming the field in under a second; the long stream ends intact."""
    beside = {}

    def long_stream():
        with SSJFClient(server.grpc_url) as client:
            beside["r"] = client.generate("Count slowly to one hundred.", max_tokens=60, ignore_eos=True,
                                          timeout=300)

    runner = threading.Thread(target=long_stream)
    runner.start()
    text = lambda v: _tensor("text_input", np.array([[v]], dtype=np.object_), "BYTES")  # noqa: E731
    scalar = lambda name, v, dt, tt: _tensor(name, np.array([[v]], dtype=dt), tt)  # noqa: E731
    big = "word " * 2_000_000  # 10 MB
    cases = {
        "missing text_input": ("llm", lambda: _grpc_error(server, "llm", [scalar("max_tokens", 4, np.int32, "INT32")]),
                               "text_input"),
        "empty text_input": ("ssjf", lambda: _grpc_error(server, "ssjf", [text(b"")]), "text_input"),
        "wrong dtype": ("ssjf", lambda: _grpc_error(server, "ssjf", [text(b"hi"), scalar("max_tokens", 1.5, np.float32,
                                                                                          "FP32")]), "max_tokens"),
        "wrong shape": ("ssjf", lambda: _grpc_error(server, "ssjf", [
            _tensor("text_input", np.array([[b"a", b"b"]], dtype=np.object_), "BYTES")]), "text_input"),
        "several prompts": ("ssjf", lambda: _grpc_error(server, "ssjf", [
            _tensor("text_input", np.array([[b"a"], [b"b"]], dtype=np.object_), "BYTES")]), "text_input"),
        "not UTF-8": ("ssjf", lambda: _grpc_error(server, "ssjf", [text(b"\xff\xfe bad")]), "text_input"),
        "longer than the context": ("ssjf", lambda: _grpc_error(server, "ssjf", [text(("lorem ipsum " * 3000).encode())]),
                                    "text_input"),
        "max_tokens 0": ("ssjf", lambda: _grpc_error(server, "ssjf", [text(b"hi"), scalar("max_tokens", 0, np.int32,
                                                                                          "INT32")]), "max_tokens"),
        "max_tokens negative": ("ssjf", lambda: _grpc_error(server, "ssjf", [
            text(b"hi"), scalar("max_tokens", -5, np.int32, "INT32")]), "max_tokens"),
        "max_tokens beyond the context": ("ssjf", lambda: _grpc_error(server, "ssjf", [
            text(b"hi"), scalar("max_tokens", 100000, np.int32, "INT32")]), "max_tokens"),
        "temperature negative": ("ssjf", lambda: _http_error(server, "ssjf", json.dumps(
            {"text_input": "hi", "temperature": -1.0}).encode()), "temperature"),
        "temperature NaN": ("ssjf", lambda: _grpc_error(server, "ssjf", [
            text(b"hi"), scalar("temperature", np.nan, np.float32, "FP32")]), "temperature"),
        "unknown parameter (HTTP field)": ("ssjf", lambda: _http_error(server, "ssjf", json.dumps(
            {"text_input": "hi", "max_token": 5}).encode()), "max_token"),
        "unknown parameter (gRPC)": ("llm", lambda: _grpc_error(server, "llm", [text(b"hi")], {"top_k": 5}),
                                     "top_k"),
        "very large body (HTTP)": ("ssjf", lambda: _http_error(server, "ssjf", json.dumps(
            {"text_input": big}).encode()), "text_input"),
        "very large body (gRPC)": ("ssjf", lambda: _grpc_error(server, "ssjf", [text(big.encode())]), "text_input"),
        "malformed JSON": ("ssjf", lambda: _http_error(server, "ssjf", b'{"text_input": "hi",'), ""),
    }
    slow, wrong = {}, {}
    for name, (_, call, field) in cases.items():
        start = time.perf_counter()
        error = call()
        took = time.perf_counter() - start
        if error is None or field not in error:
            wrong[name] = error
        if took >= 1.0:
            slow[name] = round(took, 2)
        print(f"{name:32s} {took * 1000:7.1f} ms  {(error or '')[:110]}")
    runner.join(300)
    assert not wrong, wrong
    assert not slow, slow
    assert beside["r"].ok and beside["r"].chunks >= 1, beside["r"].error
    assert is_ready(server.http_url)
    with SSJFClient(server.grpc_url) as client:
        assert client.generate("Still fine?", max_tokens=4, ignore_eos=True).ok


def test_a_request_past_its_deadline_ends_with_an_error_through_the_ensemble(server):
    """Triton 2.51 does not pass a cancel into the ensemble's decoupled step; the client's timeout
    (Triton's request timeout, forwarded by the ensemble) bounds the work instead."""
    with SSJFClient(server.grpc_url) as client:
        r = client.generate("Write a very long essay about rivers.", max_tokens=400, ignore_eos=True,
                            deadline_s=1.0, timeout=60)
        assert not r.ok and "deadline exceeded" in r.error
        assert r.jct_s < 3.0  # ended within a step of the deadline, not after 400 tokens
        assert client.generate("And now?", max_tokens=4, ignore_eos=True).ok


def queue_order(server, jobs: list[tuple[str, list]]) -> list[str]:
    """Fill every slot (16) with jobs that end a few steps apart, so slots free one at a time and
    each queued job is admitted alone, in the policy's order; then queue `jobs` (request id, inputs)
    on `llm` and return the order in which they finished."""
    order = []
    lock = threading.Lock()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    done = threading.Event()

    def callback(result, error):
        if error is None and result.get_response().parameters["triton_final_response"].bool_param:
            with lock:
                order.append(result.get_response().id)
                if len(order) == len(jobs) + 16:
                    done.set()

    client.start_stream(callback=callback)
    for i in range(16):
        client.async_stream_infer("llm", build_inputs("Fill.", max_tokens=30 + 4 * i, ignore_eos=True),
                                  request_id=f"fill{i}", enable_empty_final_response=True)
    time.sleep(0.5)
    for rid, inputs in jobs:
        client.async_stream_infer("llm", inputs, request_id=rid, enable_empty_final_response=True)
    assert done.wait(180)
    client.stop_stream()
    client.close()
    return [rid for rid in order if not rid.startswith("fill")]


def test_predicted_length_orders_the_llm_queue(server):
    """Through the real server with batch slots busy, SSJF serves the shorter predicted job first,
    and a job's own max_tokens caps its key: predicted 900 but allowed 2 tokens, it goes first."""
    inputs = lambda text, pred, n=20: build_inputs(text, max_tokens=n, ignore_eos=True) + [_pred(pred)]  # noqa: E731
    order = queue_order(server, [("long", inputs("long job", 19)), ("mid", inputs("mid job", 10)),
                                 ("capped", inputs("capped job", 900, n=2)), ("short", inputs("short job", 3))])
    assert order == ["capped", "short", "mid", "long"], order


def test_a_priority_class_goes_before_a_shorter_job_of_a_lower_class(server):
    """With every slot busy: class 0 is served before class 1 whatever the predicted lengths, and the
    length key orders within a class; the ensemble takes the priority input too."""
    inputs = lambda text, pred, prio: build_inputs(text, max_tokens=20, ignore_eos=True, priority=prio) + [_pred(pred)]  # noqa: E731
    order = queue_order(server, [("short1", inputs("short, background", 3, 1)), ("long0", inputs("long, urgent", 19, 0)),
                                 ("mid0", inputs("mid, urgent", 10, 0))])
    assert order == ["mid0", "long0", "short1"], order
    with SSJFClient(server.grpc_url) as c:
        r = c.generate("Say hi.", max_tokens=3, priority=2)
    assert r.ok, r.error


def _pred(value):
    t = grpcclient.InferInput("predicted_length", [1, 1], "INT32")
    t.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return t


def _metrics(server):
    return scrape_metrics(f"http://127.0.0.1:{server.config.metrics_port}")


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
    for name in ("ssjf_queued_work_tokens", "ssjf_preemptions_total", "ssjf_recomputed_tokens_total"):
        assert f'{name}{{policy="ssjf"}}' in after, name  # exported from the start, for dashboards and routers
    assert 'ssjf_remaining_error_tokens_count{policy="ssjf"}' in after
    assert any(k.startswith("ssjf_queue_depth") for k in after)
    assert any(k.startswith("ssjf_running_batch") for k in after)


def test_the_proxys_rank_quality_on_live_traffic_is_published(server):
    with SSJFClient(server.grpc_url) as client:
        for i in range(16):  # the gauges refresh every 16 finished requests
            assert client.generate(f"Give me {i} words.", max_tokens=1 + i % 6, ignore_eos=True).ok
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = _metrics(server)
        if after.get('ssjf_proxy_window_requests{policy="ssjf"}', 0) >= 16:
            break
        time.sleep(0.2)
    assert after['ssjf_proxy_window_requests{policy="ssjf"}'] >= 16
    assert -1.0 <= after['ssjf_proxy_kendall_tau{policy="ssjf"}'] <= 1.0
    assert after['ssjf_proxy_mae_tokens{policy="ssjf"}'] > 0


def test_the_proxy_learns_from_the_requests_it_served(server):
    """The proxy's features travel with each request through the ensemble to the llm, which learns
    from the true lengths and refits; a swapped-in correction reaches the proxy through its file."""
    before = _metrics(server).get('ssjf_proxy_refits_total{policy="ssjf",result="kept"}', 0) + \
        _metrics(server).get('ssjf_proxy_refits_total{policy="ssjf",result="swapped"}', 0)
    with SSJFClient(server.grpc_url) as client:
        for i in range(24):  # lengths the shipped proxy cannot know: set by the client, by prompt kind
            essay = i % 2 == 0
            prompt = f"Write an essay about topic {i}." if essay else f"Answer in one word: item {i}?"
            assert client.generate(prompt, max_tokens=12 if essay else 2, ignore_eos=True).ok
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = _metrics(server)
        refits = sum(v for k, v in after.items() if k.startswith("ssjf_proxy_refits_total"))
        if refits > before:
            break
        time.sleep(0.5)
    assert refits > before, "no refit ran: the llm got no features from the ensemble"
    version = after['ssjf_proxy_head_version{policy="ssjf"}']
    path = Path(server.env["SSJF_PROXY_REFRESH_PATH"])
    assert path.exists() == (version >= 1)


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


def test_a_poisoned_request_batched_with_normal_ones_fails_alone(server):
    """A `messages` nested 100,000 levels deep, a lone surrogate and a non-JSON body, sent at once with
    23 normal requests (the proxy's dynamic batcher groups them): each bad one gets an error naming
    its field, and none of the 23 fails."""
    deep = "[" * 100_000 + "]" * 100_000
    bad = {"deep": deep, "surrogate": '[{"role": "user", "content": "x\\ud800"}]', "junk": "{not json"}
    results = {}

    def run(name, prompt=None, messages_json=None):
        with SSJFClient(server.grpc_url) as client:
            if messages_json is None:
                results[name] = client.generate(prompt, max_tokens=4, ignore_eos=True, timeout=120)
            else:  # raw JSON, as a hostile client sends it (generate() would serialise a list)
                inputs = build_inputs(None, 4, True, True, None, messages=[{"role": "user", "content": "x"}])
                for t in inputs:
                    if t.name() == "messages":
                        t.set_data_from_numpy(np.array([[messages_json.encode("utf-8", "surrogatepass")]], dtype=np.object_))
                client.client.async_stream_infer("ssjf", inputs, enable_empty_final_response=True)
                response, error, _ = client._responses.get(timeout=120)
                results[name] = error.message() if error is not None else "no error"

    threads = [threading.Thread(target=run, args=(f"ok{i}", f"Say a word, number {i}.")) for i in range(23)]
    threads += [threading.Thread(target=run, args=(name, None, raw)) for name, raw in bad.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    failed = [n for n in results if n.startswith("ok") and not results[n].ok]
    assert not failed, {n: results[n].error for n in failed}
    assert "messages: JSON nested deeper than" in results["deep"]
    assert "messages[0].content: not valid Unicode" in results["surrogate"] or "messages: not valid UTF-8" in results["surrogate"]
    assert "messages: not valid JSON" in results["junk"]
    assert is_ready(server.http_url)


def test_every_metric_the_grafana_dashboard_queries_is_exported(server):
    """deploy/grafana/ssjf.json: each series its queries name exists on a running server's /metrics
    (after some traffic, so the labelled counters have been created)."""
    import re

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "ssjf.json").read_text())
    with SSJFClient(server.grpc_url) as client:
        assert client.generate("Dashboard traffic.", max_tokens=4, ignore_eos=True).ok
        assert not client.generate("", max_tokens=4).ok
    time.sleep(1.5)  # metric updates follow the final send; the queued-work gauge is set once a second
    names = {re.sub(r"\{.*", "", k) for k in _metrics(server)}
    queried = {m for p in dashboard["panels"] for t in p["targets"] for m in re.findall(r"ssjf_[a-z_]+", t["expr"])}
    assert queried and len(dashboard["panels"]) >= 10
    missing = {m for m in queried if m not in names}
    assert not missing, missing
