"""Two real servers behind a real nginx with deploy/nginx.conf's policy (least connections, passive
failure checks): a burst is spread over both, and with one replica killed mid-burst no request
hangs, every error says what happened, and new requests go to the one left."""

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ssjf.config import free_ports
from ssjf.server import ServerConfig, TritonServer
from ssjf_client import SSJFClient
from ssjf_client.client import metric_total, scrape_metrics

NGINX_CONF = Path(__file__).resolve().parents[2] / "deploy" / "nginx.conf"
pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (make test installs it)")


def nginx_version() -> tuple[int, ...]:
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr  # "nginx version: nginx/1.22.1"
    return tuple(int(x) for x in re.search(r"nginx/([\d.]+)", out).group(1).split("."))


def local_conf(replicas: list[TritonServer], http_port: int, grpc_port: int) -> str:
    """deploy/nginx.conf with the compose names and ports replaced by these loopback ones: the
    same upstream policy, limits and routes as deployed."""
    conf = NGINX_CONF.read_text()
    for name, srv in zip(("triton", "triton-b"), replicas):
        conf = conf.replace(f"server {name}:8000 ", f"server {srv.config.host}:{srv.config.http_port} ")
        conf = conf.replace(f"server {name}:8001 ", f"server {srv.config.host}:{srv.config.grpc_port} ")
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{http_port};")
    conf = conf.replace("listen 8001;", f"listen 127.0.0.1:{grpc_port};")
    if nginx_version() < (1, 25, 1):  # Debian 12's nginx 1.22 spells `http2 on;` on the listen line
        conf = conf.replace(f"listen 127.0.0.1:{grpc_port};\n        http2 on;", f"listen 127.0.0.1:{grpc_port} http2;")
    assert not re.search(r"server triton(-b)?:", conf) and "listen 800" not in conf, conf
    return conf


@pytest.fixture(scope="module")
def balanced(tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("replicas"))
    env = dict(os.environ, SSJF_POLICY="ssjf", SSJF_RUNNER="torch", SSJF_MAX_BATCH_SIZE="8", SSJF_NUM_THREADS="1",
               SSJF_PROXY_REFRESH="0", SSJF_MAX_ENGINE_RESTARTS="0")
    replicas = [TritonServer(ServerConfig.on_free_ports(), env=env, log_path=root / f"replica{i}.log") for i in range(2)]
    nginx = None
    try:
        for srv in replicas:
            srv.start(timeout=300)
        http_port, grpc_port = free_ports(2)
        (root / "nginx.conf").write_text(local_conf(replicas, http_port, grpc_port))
        (root / "logs").mkdir()
        nginx = subprocess.Popen(["nginx", "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "logs" / "error.log"),
                                  "-g", f"daemon off; pid {root / 'nginx.pid'};"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with SSJFClient(f"127.0.0.1:{grpc_port}") as client:
                    if client.generate("Hi", max_tokens=2, timeout=60).ok:
                        break
            except Exception:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"nginx did not pass a request through: {(root / 'logs' / 'error.log').read_text()[-2000:]}")
        yield replicas, f"127.0.0.1:{grpc_port}"
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
        for srv in replicas:
            srv.stop()


def served(srv: TritonServer) -> float:
    """Requests the replica's llm ended (any status)."""
    return metric_total(scrape_metrics(srv.metrics_url), "ssjf_requests_total")


def one(url: str, prompt: str, max_tokens: int, timeout: float = 120.0):
    """One request on its own stream (nginx balances per gRPC call, and a stream is one call)."""
    try:
        with SSJFClient(url) as client:
            return client.generate(prompt, max_tokens=max_tokens, ignore_eos=True, timeout=timeout)
    except Exception as exc:  # the connection itself failed: that is an answer too, not a hang
        return exc


def test_a_burst_is_spread_over_both_replicas(balanced):
    replicas, url = balanced
    before = [served(s) for s in replicas]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: one(url, f"Count to {i % 7 + 2}.", 8), range(64)))
    assert all(getattr(r, "ok", False) for r in results), [getattr(r, "error", r) for r in results if not getattr(r, "ok", False)]
    shares = [(served(s) - b) / 64 for s, b in zip(replicas, before)]
    print(f"burst of 64 through nginx: replica shares {shares}")
    assert all(share >= 0.4 for share in shares), shares


def test_a_killed_replica_is_routed_around_and_no_request_hangs(balanced):
    """Runs last: it kills the second replica's tritonserver (and its stubs) mid-burst."""
    replicas, url = balanced
    results: dict[int, object] = {}

    def run(i):
        results[i] = one(url, f"Write a short poem about the number {i}.", 48)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    victim = replicas[1]
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    killed = time.monotonic()
    for t in threads:
        t.join(150)
    assert not any(t.is_alive() for t in threads), "a request hung after its replica was killed"
    failed = {i: getattr(r, "error", None) or repr(r) for i, r in results.items() if not getattr(r, "ok", False)}
    print(f"24 in flight, one replica killed: {24 - len(failed)} ok, {len(failed)} ended with an error: {failed}")
    assert len(results) == 24
    assert all(message.strip() for message in failed.values()), failed  # every error says something
    # and what: the client names a lost connection as such (gRPC's own words follow)
    lost = [m for m in failed.values() if m.startswith("connection to the server lost")]
    assert len(lost) == len(failed), failed
    # new requests go to the replica left, at once (nginx tries the next upstream on a refused connection)
    after = [one(url, "Say yes.", 4, timeout=60) for _ in range(8)]
    assert all(getattr(r, "ok", False) for r in after), [getattr(r, "error", r) for r in after]
    print(f"8 requests after the kill: all served within {time.monotonic() - killed:.1f}s of it")
