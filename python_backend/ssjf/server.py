"""The one launcher: runs the tritonserver binary shipped in the nvidia-pytriton wheel
over this project's model repository, bound to loopback, ports from the environment.
`ssjf serve` (make serve) runs it in the foreground; the tests start it on free ports.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

from .assets import _package_dir
from .config import ServerConfig, cache_dir

RESTRICTED = "model-repository,shared-memory,trace,logging"  # the admin APIs


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


def command(config: ServerConfig) -> list[str]:
    repo = Path(config.model_repository)
    if not (repo / "llm" / "config.pbtxt").exists():
        raise FileNotFoundError(f"no model repository at {repo} (run from the checkout, or set SSJF_MODEL_REPOSITORY)")
    return [
        str(pytriton_dir() / "bin" / "tritonserver"),
        f"--model-repository={config.model_repository}",
        f"--backend-directory={backend_dir()}",
        f"--http-address={config.host}", f"--http-port={config.http_port}",
        f"--grpc-address={config.host}", f"--grpc-port={config.grpc_port}",
        f"--metrics-address={config.host}", f"--metrics-port={config.metrics_port}",
        "--model-control-mode=none",
        f"--http-restricted-api={RESTRICTED}:ssjf-admin-key={config.admin_key}",
        f"--grpc-restricted-protocol={RESTRICTED}:ssjf-admin-key={config.admin_key}",
        "--exit-timeout-secs=5",
        "--strict-readiness=true",
        f"--log-verbose={config.log_verbose}",
        *config.extra_args,
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
        self.proc = subprocess.Popen(command(self.config), env=self.env, stdout=out, stderr=subprocess.STDOUT,
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
    cmd = command(config)
    print("serving:", " ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, server_env())
