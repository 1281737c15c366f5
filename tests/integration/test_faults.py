"""Faults through a real tritonserver. The llm model here is the real one with faults injected by a
wrapper this test writes (the product has no fault hooks): a prompt containing POISON makes any
forward pass that includes it fail; a prompt containing CRASH crashes the engine loop itself."""

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ssjf.server import ServerConfig, TritonServer, is_ready
from ssjf_client import SSJFClient

WRAPPER = '''
import importlib.util

_spec = importlib.util.spec_from_file_location("ssjf_real_llm_model", {real!r})
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)


class TritonPythonModel(_real.TritonPythonModel):
    def initialize(self, args):
        super().initialize(args)
        engine = self.engine
        marked = lambda req, word: word in engine.tokenizer.decode(req.prompt_ids)  # noqa: E731
        decode, step = engine.runner.decode, engine.step

        def poisoned_decode(tokens, positions, slots=None):
            rows = set(range(len(tokens)) if slots is None else slots)
            if any(engine.runner.slot_of(r) in rows and marked(r, "POISON") for r in engine.scheduler.running):
                raise RuntimeError("injected fault: poisoned row")
            return decode(tokens, positions, slots)

        def crashing_step():
            if any(marked(r, "CRASH") for r in list(engine._inbox)):
                raise RuntimeError("injected crash of the engine loop")
            step()

        engine.runner.decode = poisoned_decode
        engine.step = crashing_step
'''


@pytest.fixture(scope="module")
def faulty_server(tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("faulty"))
    repo = root / "model_repository"
    real = ServerConfig().model_repository  # the checkout's
    shutil.copytree(real, repo, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "llm" / "1" / "model.py").write_text(WRAPPER.format(real=str(real / "llm" / "1" / "model.py")))
    # the poisoned row is injected into the torch runner's decode (it retries a failed batch row by row)
    env = {"SSJF_POLICY": "ssjf", "SSJF_BATCHING": "continuous", "SSJF_MAX_ENGINE_RESTARTS": "0",
           "SSJF_RUNNER": "torch"}
    srv = TritonServer(ServerConfig.on_free_ports(model_repository=repo), env=dict(os.environ, **env),
                       log_path=root / "tritonserver.log")
    srv.start(timeout=240)
    yield srv
    srv.stop()


def test_a_request_that_fails_in_the_batch_fails_alone(faulty_server):
    results = {}

    def run(name, prompt, n):
        with SSJFClient(faulty_server.grpc_url) as client:
            results[name] = client.generate(prompt, max_tokens=n, ignore_eos=True, timeout=120)

    threads = [threading.Thread(target=run, args=(f"ok{i}", f"Say something nice, number {i}.", 24)) for i in range(3)]
    threads.append(threading.Thread(target=run, args=("poison", "POISON in this prompt.", 24)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not results["poison"].ok and "poisoned row" in results["poison"].error
    for i in range(3):
        assert results[f"ok{i}"].ok, results[f"ok{i}"].error
    assert is_ready(faulty_server.http_url)


def test_a_dead_engine_errors_its_requests_and_the_server_goes_not_ready(faulty_server):
    """Runs last: with no restarts left the engine gives up, in-flight requests get an error, and
    the server stops (SIGTERM from the llm model), so readiness fails and an orchestrator restarts it."""
    with SSJFClient(faulty_server.grpc_url) as client:
        r = client.generate("CRASH now.", max_tokens=8, ignore_eos=True, timeout=60)
    assert not r.ok and "injected crash" in r.error
    deadline = time.monotonic() + 30
    while is_ready(faulty_server.http_url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not is_ready(faulty_server.http_url)
    # it exits by itself, within Triton's exit timeout (drain + 15 s) plus the llm's bounded finalize
    # joins (engine 10 s, learner 5 s, responder 10 s); on a loaded machine that takes more than 30 s
    bound = faulty_server.config.drain_s + 15 + 25
    try:
        faulty_server.proc.wait(bound)
    except subprocess.TimeoutExpired:
        pytest.fail(f"tritonserver still running {bound:.0f} s after the engine died; its log ends:\n"
                    + "\n".join(faulty_server.log_path.read_text(errors="replace").splitlines()[-40:]))
    assert faulty_server.proc.returncode is not None
