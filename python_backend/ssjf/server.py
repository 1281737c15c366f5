"""The one launcher: runs the tritonserver binary shipped in the nvidia-pytriton wheel
over this project's model repository, bound to loopback, ports from the environment.
`ssjf serve` (make serve) runs it in the foreground; the tests start it on free ports.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .assets import _package_dir, cache_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
RESTRICTED = "model-repository,shared-memory,trace,logging"  # the admin APIs
MODEL_REPOSITORY = REPO_ROOT / "model_repository"


def pytriton_dir() -> Path:
    return _package_dir("pytriton") / "tritonserver"


def backend_dir() -> Path:
    """A backends folder holding the Python backend with the stub for this interpreter's version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    dist = pytriton_dir()
    target = cache_dir() / "triton" / version / "backends"
    python = target / "python"
    stub = python / "triton_python_backend_stub"
    if not stub.exists():
        shutil.copytree(dist / "backends" / "python", python, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(dist / "python_backend_stubs" / version / "triton_python_backend_stub", stub)
    return target


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """PATH starts with this venv's bin (the stub picks its Python there); libs for the binary."""
    env = dict(os.environ if base is None else base)
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(pytriton_dir().parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = ":".join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@dataclass
class ServerConfig:
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"
    model_repository: Path = MODEL_REPOSITORY
    log_verbose: int = 0
    # Admin APIs answer only requests carrying the header `ssjf-admin-key: <key>`; with no key
    # configured a random one is drawn, which locks them for everyone.
    admin_key: str = field(default_factory=lambda: os.environ.get("SSJF_ADMIN_KEY") or secrets.token_hex(16))
    extra_args: list[str] = field(default_factory=list)

    @classmethod
    def on_free_ports(cls, **kw) -> "ServerConfig":
        http, grpc, metrics = free_ports(3)
        return cls(http_port=http, grpc_port=grpc, metrics_port=metrics, **kw)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "ServerConfig":
        environ = os.environ if environ is None else environ
        return cls(
            http_port=int(environ.get("HTTP_PORT", 8000)),
            grpc_port=int(environ.get("GRPC_PORT", 8001)),
            metrics_port=int(environ.get("METRICS_PORT", 8002)),
            host=environ.get("SSJF_HOST", "127.0.0.1"),
            model_repository=Path(environ.get("SSJF_MODEL_REPOSITORY", MODEL_REPOSITORY)),
        )

    def command(self) -> list[str]:
        return [
            str(pytriton_dir() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_dir()}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            "--model-control-mode=none",
            f"--http-restricted-api={RESTRICTED}:ssjf-admin-key={self.admin_key}",
            f"--grpc-restricted-protocol={RESTRICTED}:ssjf-admin-key={self.admin_key}",
            "--exit-timeout-secs=5",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that are free on host right now."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def is_ready(http_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{http_url}/v2/health/ready", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


class TritonServer:
    """A tritonserver child process (context manager): start, wait until ready, stop."""

    def __init__(self, config: ServerConfig, env: dict[str, str] | None = None, log_path: Path | None = None):
        self.config = config
        self.env = server_env(env)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    def start(self, timeout: float = 180.0) -> "TritonServer":
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.config.command(), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}; log: {self.log_path}")
            if is_ready(self.http_url):
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f}s; log: {self.log_path}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(config: ServerConfig) -> None:
    """Run tritonserver in the foreground (replaces this process)."""
    cmd = config.command()
    print("serving:", " ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, server_env())
