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
    env = dict(os.environ, SSJF_POLICY="ssjf", SSJF_BATCHING="continuous", SSJF_MAX_BATCH_SIZE="16")
    srv = TritonServer(ServerConfig.on_free_ports(), env=env, log_path=log)
    srv.start(timeout=240)
    yield srv
    srv.stop()
    print(f"tritonserver log: {log}")
