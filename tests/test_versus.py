"""`ssjf versus`: the OpenAI streaming client against a small local SSE server, and its contenders."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ssjf_tools.bench import Job, combine_rounds
from ssjf_tools.versus import markdown, openai_replay, parse_contender


class Handler(BaseHTTPRequestHandler):
    bodies: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.bodies.append(body)
        if body["messages"][0]["content"] == "bad":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "max_tokens too large"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n = body["max_tokens"]
        for i in range(n):
            chunk = {"choices": [{"delta": {"content": f"t{i} "}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if body["messages"][0]["content"] != "cut":
            usage = {"choices": [], "usage": {"completion_tokens": n}}
            self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture()
def server():
    Handler.bodies = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_the_openai_replay_times_every_request_and_reports_failures(server):
    jobs = [Job(0, "hello", 5, 0.0), Job(1, "bad", 3, 0.05), Job(2, "cut", 2, 0.1)]
    tokens = openai_replay(server, "m", jobs, ignore_eos=True, timeout=10, priorities=[7, 1, 3])
    ok, bad, cut = jobs
    assert ok.error is None and ok.chunks == 5 and tokens[0] == 5
    assert 0.0 <= ok.sent <= ok.first <= ok.done
    assert bad.error.startswith("HTTP 400") and bad.done is not None
    assert cut.error == "the stream ended without [DONE]"
    by_prompt = {b["messages"][0]["content"]: b for b in Handler.bodies}
    assert by_prompt["hello"]["priority"] == 7 and by_prompt["bad"]["priority"] == 1
    assert all(b["ignore_eos"] and b["stream"] and b["temperature"] == 0.0 for b in Handler.bodies)
    assert bad.arrival == pytest.approx(0.05) and bad.sent >= 0.05  # sent at its arrival time, not before


def test_contenders_are_parsed_and_bad_names_are_refused():
    assert parse_contender("vllm-priority") == ("vllm-serve", "priority")
    assert parse_contender("ssjf@torch") == ("triton", "ssjf@torch")
    for bad in ("ssjf", "lifo@vllm", "ssjf@tensorrt"):
        with pytest.raises(SystemExit, match="unknown contender"):
            parse_contender(bad)


def test_ratios_are_taken_per_round_against_the_baseline():
    rounds = [{"vllm-fcfs": {"completed": 1, "failed": 0, "mean_jct_s": 4.0, "throughput_tok_s": 100.0},
               "ssjf@vllm": {"completed": 1, "failed": 0, "mean_jct_s": 3.0, "throughput_tok_s": 105.0}},
              {"vllm-fcfs": {"completed": 1, "failed": 0, "mean_jct_s": 8.0, "throughput_tok_s": 90.0},
               "ssjf@vllm": {"completed": 1, "failed": 0, "mean_jct_s": 4.0, "throughput_tok_s": 90.0}}]
    out = combine_rounds(rounds, base="vllm-fcfs", keys=("mean_jct_s", "throughput_tok_s"))
    assert out["ssjf@vllm"]["mean_jct_s_vs_vllm-fcfs"]["rounds"] == pytest.approx([0.75, 0.5])
    report = {"config": {"baseline": "vllm-fcfs", "dtype": "float32", "max_batch_size": 8, "arrivals": "poisson",
                         "num_requests": 1},
              "machine": {"cpu": "x", "isa": ["avx2"], "cores": 2, "device": "cpu", "vllm": "0.32.0"},
              "runs": [{"rate": 1.0, "rounds": rounds, "contenders": out}]}
    assert "| ssjf@vllm |" in markdown(report) and "0.62x (0.50-0.75)" in markdown(report)
