"""docker-compose.yml cannot run here (no Docker engine): check what a GPU box relies on."""

from pathlib import Path

import yaml

COMPOSE = yaml.safe_load((Path(__file__).resolve().parents[1] / "docker-compose.yml").read_text())


def test_triton_service_runs_the_image_make_check_gpu_image_resolves_for_on_a_gpu():
    triton = COMPOSE["services"]["triton"]
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    image = next(line.split(":=")[1].strip() for line in makefile.splitlines() if line.startswith("GPU_IMAGE :="))
    assert triton["image"] == image == "nvcr.io/nvidia/tritonserver:25.12-py3"
    assert "GPU_IMAGE_PYTHON := 3.12" in makefile  # that image's Python (Ubuntu 24.04); vLLM 0.32 needs >= 3.11
    assert "check-gpu-image" in next(line for line in makefile.splitlines() if line.startswith("test:"))
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert triton["environment"]["SSJF_DEVICE"] == "cuda"
    command = " ".join(triton["command"])
    assert "exec python3 -m ssjf.cli serve" in command  # the supervisor, as make serve runs it
    assert triton["environment"]["SSJF_MODEL_REPOSITORY"] == "/workspace/model_repository"


def test_ports_are_published_on_loopback_only():
    ports = COMPOSE["services"]["triton"]["ports"]
    assert sorted(ports) == ["127.0.0.1:8000:8000", "127.0.0.1:8001:8001", "127.0.0.1:8002:8002",
                             "127.0.0.1:8003:9000"]


def test_healthcheck_is_readiness_and_locust_waits_for_it():
    health = COMPOSE["services"]["triton"]["healthcheck"]
    assert any("/v2/health/ready" in part for part in health["test"])
    locust = COMPOSE["services"]["locust"]
    assert locust["depends_on"]["triton"]["condition"] == "service_healthy"
    assert "loadtest/locustfile.py" in " ".join(locust["command"]) and "triton:8001" in " ".join(locust["command"])


def test_admin_apis_are_restricted_with_a_key_from_the_environment():
    from ssjf.config import ServerConfig
    from ssjf.server import command

    triton = COMPOSE["services"]["triton"]
    assert triton["environment"]["SSJF_ADMIN_KEY"].startswith("${SSJF_ADMIN_KEY:?")
    config = ServerConfig.from_env({"SSJF_ADMIN_KEY": "k3y", "SSJF_MODEL_REPOSITORY": str(ServerConfig().model_repository)})
    args = " ".join(command(config))
    assert "--http-restricted-api=model-repository,shared-memory,trace,logging:ssjf-admin-key=k3y" in args
    assert "--grpc-restricted-protocol=model-repository,shared-memory,trace,logging:ssjf-admin-key=k3y" in args


def test_the_drain_fits_in_the_grace_period_and_tritons_exit_timeout():
    from ssjf.config import ServerConfig
    from ssjf.server import command

    triton = COMPOSE["services"]["triton"]
    grace = int(triton["stop_grace_period"].rstrip("s"))
    drain = 30  # SSJF_DRAIN_S's default in compose
    assert triton["environment"]["SSJF_DRAIN_S"] == "${SSJF_DRAIN_S:-30}"
    timeout = next(int(a.split("=")[1]) for a in command(ServerConfig(drain_s=drain)) if a.startswith("--exit-timeout"))
    assert drain < timeout < grace


def test_replicas_profile_puts_two_gpu_replicas_behind_nginx():
    services = COMPOSE["services"]
    a, b, lb = services["triton"], services["triton-b"], services["lb"]
    assert b["image"] == a["image"] and b["command"] == a["command"] and b["healthcheck"] == a["healthcheck"]
    gpu = lambda s: s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]  # noqa: E731
    assert gpu(a) != gpu(b)  # one GPU each
    assert b["profiles"] == ["replicas"] and not b["ports"]  # reached through the balancer only
    assert lb["image"].startswith("nginx:") and lb["profiles"] == ["replicas"]
    assert all(lb["depends_on"][s]["condition"] == "service_healthy" for s in ("triton", "triton-b"))
    assert sorted(lb["ports"]) == ["127.0.0.1:9000:8000", "127.0.0.1:9001:8001"]
    mount = next(v for v in lb["volumes"] if v.endswith("/etc/nginx/nginx.conf:ro"))
    conf = (Path(__file__).resolve().parents[1] / mount.split(":")[0]).read_text()
    for port in ("8000", "8001"):
        assert f"server triton:{port}" in conf and f"server triton-b:{port}" in conf
    assert "grpc_pass grpc://triton_grpc" in conf and "least_conn" in conf and "http2 on" in conf
    assert "proxy_buffering off" in conf  # generate_stream's events are not held back
    assert "return 403" in conf  # the admin APIs are not routed


def test_locust_can_target_the_balancer():
    command = " ".join(COMPOSE["services"]["locust"]["command"])
    assert "--host $${SSJF_TARGET:-triton:8001}" in command or "--host ${SSJF_TARGET:-triton:8001}" in command
