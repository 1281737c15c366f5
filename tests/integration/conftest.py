"""A real tritonserver for the session, on free loopback ports, over the project's model repository."""

import os
from pathlib import Path

import pytest

from ssjf.server import ServerConfig, TritonServer


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    log = Path(tmp_path_factory.mktemp("triton")) / "tritonserver.log"
    # the tests rely on these engine settings, whatever the caller's environment says
    env = dict(os.environ, SSJF_POLICY="ssjf", SSJF_BATCHING="continuous", SSJF_MAX_BATCH_SIZE="16",
               # the proxy refresh, fast, on a file of its own (never the cache dir make serve reads)
               SSJF_PROXY_REFRESH="1", SSJF_PROXY_REFRESH_INTERVAL_S="1", SSJF_PROXY_REFRESH_MIN_ROWS="16",
               SSJF_PROXY_REFRESH_PATH=str(log.parent / "refresh" / "proxy.npz"))
    srv = TritonServer(ServerConfig.on_free_ports(), env=env, log_path=log)
    srv.start(timeout=240)
    yield srv
    srv.stop()
    print(f"tritonserver log: {log}")
