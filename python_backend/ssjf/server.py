"""The one launcher: runs the tritonserver binary shipped in the nvidia-pytriton wheel (or the
one on PATH, in Triton's container) over this project's model repository, bound to loopback,
ports from the environment. The tests start it bare on free ports (TritonServer); `ssjf serve`
(make serve) runs it under a Supervisor:
  - a stub process that dies (kill -9, the OOM killer) leaves Triton 2.51 holding its streams open
    and answering ready; the supervisor sees the stub gone within a second, kills the server, so
    every stream ends with an error and readiness fails, and starts a fresh one;
  - SIGTERM drains: readiness turns false and new requests are refused at once (Triton's own stop),
    in-flight requests get `drain_s` to finish (the llm model reads the deadline from a drain
    file), the rest end with an error, and the server exits before Triton's exit timeout, cleanly;
  - the public HTTP port is the gate (ssjf.gate) in front of Triton's HTTP on a private port.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from .assets import _package_dir
from .config import ServerConfig, cache_dir, free_ports

RESTRICTED = "model-repository,shared-memory,trace,logging"  # the admin APIs


def pytriton_dir() -> Path:
    return _package_dir("pytriton") / "tritonserver"


def tritonserver_binary() -> str:
    """The wheel's binary; in Triton's own container (no pytriton) the one on PATH."""
    try:
        return str(pytriton_dir() / "bin" / "tritonserver")
    except (ImportError, ModuleNotFoundError, FileNotFoundError):
        found = shutil.which("tritonserver")
        if found is None:
            raise FileNotFoundError("no tritonserver: install nvidia-pytriton (make install) or put it on PATH")
        return found


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
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    if "pytriton" in tritonserver_binary():
        libs.append(str(pytriton_dir().parent.parent / "nvidia_pytriton.libs"))
    env["LD_LIBRARY_PATH"] = ":".join([p for p in libs if p] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def command(config: ServerConfig) -> list[str]:
    repo = Path(config.model_repository)
    if not (repo / "llm" / "config.pbtxt").exists():
        raise FileNotFoundError(f"no model repository at {repo} (run from the checkout, or set SSJF_MODEL_REPOSITORY)")
    wheel = "pytriton" in tritonserver_binary()
    return [
        tritonserver_binary(),
        f"--model-repository={config.model_repository}",
        *([f"--backend-directory={backend_dir()}"] if wheel else []),
        f"--http-address={config.http_host or config.host}", f"--http-port={config.http_port}",
        f"--grpc-address={config.host}", f"--grpc-port={config.grpc_port}",
        f"--metrics-address={config.host}", f"--metrics-port={config.metrics_port}",
        "--model-control-mode=none",
        f"--http-restricted-api={RESTRICTED}:ssjf-admin-key={config.admin_key}",
        f"--grpc-restricted-protocol={RESTRICTED}:ssjf-admin-key={config.admin_key}",
        # Triton's own deadline sits past the drain's: it exits as soon as the drain has ended every
        # request, and its "Exiting immediately" path (a heap-corrupting abort in 2.51) never runs
        f"--exit-timeout-secs={int(config.drain_s) + 15}",
        "--strict-readiness=true",
        f"--log-verbose={config.log_verbose}",
        *config.extra_args,
    ]


def reachable(host: str) -> str:
    """Where to call a port bound on `host`: loopback for one bound on every address."""
    return "127.0.0.1" if host == "0.0.0.0" else host


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
        return f"http://{reachable(self.config.http_host or self.config.host)}:{self.config.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{reachable(self.config.host)}:{self.config.metrics_port}"

    @property
    def grpc_url(self) -> str:
        return f"{reachable(self.config.host)}:{self.config.grpc_port}"

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


class DrainSignal:
    """The supervisor's word to the llm model (another process) that the server is shutting down:
    a file holding the wall-clock time by which every request must have ended."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def send(self, seconds: float) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(repr(time.time() + seconds))
        tmp.replace(self.path)  # whole or absent, never half written

    def seconds_left(self) -> float | None:
        """None until the drain starts; then the seconds left before its deadline."""
        try:
            return float(self.path.read_text()) - time.time()
        except (OSError, ValueError):
            return None

    def watch(self, on_drain, stop: threading.Event, every_s: float = 0.2) -> threading.Thread:
        """Call on_drain(seconds_left) once, from a thread, when the drain starts."""
        def poll():
            while not stop.wait(every_s):
                left = self.seconds_left()
                if left is not None:
                    on_drain(left)
                    return

        thread = threading.Thread(target=poll, name="ssjf-drain-watch", daemon=True)
        thread.start()
        return thread


def stub_processes(parent: int) -> dict[int, str]:
    """The Python backend stubs tritonserver `parent` runs: pid -> the model each serves."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent:
                continue
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if argv and argv[0].endswith(b"triton_python_backend_stub"):
            model = next((Path(a.decode()).parent.parent.name for a in argv if a.endswith(b"model.py")), "?")
            found[int(stat.parent.name)] = model
    return found


def die_with_parent() -> None:
    """In a child before exec: the kernel kills it when its parent dies (even by SIGKILL), so a
    supervisor that is killed never leaves a tritonserver behind. Linux only; elsewhere nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def exit_with_parent(every_s: float = 1.0) -> threading.Thread:
    """In a model's stub: exit when tritonserver, its parent, is gone (killed with its supervisor),
    rather than live on as an orphan holding memory and a core. Triton's own check misses it when
    the stub is busy (seen with the vllm runner)."""
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(every_s)
            if os.getppid() != parent:
                print(f"ssjf: tritonserver (pid {parent}) is gone; this stub exits", flush=True)
                os._exit(1)

    thread = threading.Thread(target=watch, name="ssjf-parent-watch", daemon=True)
    thread.start()
    return thread


def is_running(pid: int) -> bool:
    """pid exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class Supervisor:
    """`ssjf serve`: tritonserver as a child, replaced when it or one of its stubs dies, drained on
    SIGTERM/SIGINT (a second signal stops at once), behind the HTTP gate. run() returns the exit code."""

    def __init__(self, config: ServerConfig, env: dict[str, str] | None = None, log_path: Path | None = None,
                 poll_s: float = 0.5):
        self.config, self.log_path, self.poll_s = config, log_path, poll_s
        self.runtime = Path(tempfile.mkdtemp(prefix="ssjf-serve-"))
        self.drain = DrainSignal(self.runtime / "drain")
        self.env = dict(os.environ if env is None else env, SSJF_DRAIN_FILE=str(self.drain.path))
        self.inner = config
        if config.http_gate:  # Triton's HTTP on a private loopback port; the public one is the gate's
            from dataclasses import replace

            self.inner = replace(config, http_host="127.0.0.1", http_port=free_ports(1)[0])
        self.signals = 0
        self.restarts = 0
        self.server: TritonServer | None = None

    def log(self, message: str) -> None:
        print(f"ssjf serve: {message}", flush=True)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        gate = None
        if self.config.http_gate:
            from .gate import Gate

            gate = Gate(self.config.host, self.config.http_port, f"http://127.0.0.1:{self.inner.http_port}",
                        self.config.admin_key, self.config.max_body_bytes, self.config.max_json_depth).start()
            self.log(f"HTTP gate on {self.config.host}:{self.config.http_port} -> tritonserver's HTTP on "
                     f"127.0.0.1:{self.inner.http_port}")
        openai = self._openai() if self.config.openai_port else None
        try:
            return self._supervise()
        finally:
            if openai is not None:
                openai.stop()
            if gate is not None:
                gate.stop()
            shutil.rmtree(self.runtime, ignore_errors=True)

    def _openai(self):
        """The OpenAI-compatible API over the ensemble (gRPC), with the served model's tokenizer for usage."""
        from transformers import AutoTokenizer

        from .assets import resolve_llm
        from .config import EngineConfig
        from .cpus import service_cpus
        from .openai_api import OpenAIServer

        engine = EngineConfig.from_strings({}, self.env)
        tokenizer = AutoTokenizer.from_pretrained(resolve_llm(engine.model))
        cpus = service_cpus() if engine.device == "cpu" else None  # off the engine's cores, as Triton's own threads
        grpc_url = f"{reachable(self.config.host)}:{self.config.grpc_port}"
        api = OpenAIServer(self.config.host, self.config.openai_port, grpc_url,
                           engine.model, tokenizer, engine.request_timeout_s, cpus).start()
        self.log(f"OpenAI API on {self.config.host}:{self.config.openai_port} (model {engine.model!r})")
        return api

    def _on_signal(self, signum, frame) -> None:
        """The first signal starts the drain at once (readiness false within milliseconds)."""
        self.signals += 1
        if self.signals == 1 and self.server is not None and self.server.proc.poll() is None:
            self.log(f"draining: in-flight requests have {self.config.drain_s:.0f} s to finish")
            self.drain.send(self.config.drain_s)
            self.server.proc.send_signal(signal.SIGTERM)

    def _supervise(self) -> int:
        while True:
            server = TritonServer(self.inner, env=self.env, log_path=self.log_path)
            out = open(self.log_path, "ab") if self.log_path else None  # None: this process's own output
            server.proc = subprocess.Popen(command(self.inner), env=server.env, stdout=out,
                                           stderr=subprocess.STDOUT if out else None, start_new_session=True,
                                           preexec_fn=die_with_parent)
            self.server = server
            stubs: dict[int, str] = {}
            while True:
                if self.signals:
                    return self._drain(stubs)
                code = self.server.proc.poll()
                if code is not None:
                    why = f"tritonserver exited with {code}"
                    break
                if not stubs and is_ready(self.server.http_url, timeout=0.5):
                    stubs = stub_processes(self.server.proc.pid)
                    self.log(f"ready; stubs {stubs}")
                dead = [f"{model} (pid {pid})" for pid, model in stubs.items() if not is_running(pid)]
                if dead:
                    why = f"the Python stub of {', '.join(dead)} died"
                    break
                time.sleep(self.poll_s)
            self._kill()
            self.restarts += 1
            if self.restarts > self.config.max_restarts:
                self.log(f"{why}; out of restarts ({self.config.max_restarts}), giving up")
                return 1
            self.log(f"{why}; every request in flight ended with it; restarting "
                     f"({self.restarts} of {self.config.max_restarts})")
            time.sleep(1.0)

    def _kill(self) -> None:
        """tritonserver and every stub it started (its process group), at once."""
        try:
            os.killpg(self.server.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.server.proc.wait()

    def _drain(self, stubs: dict[int, str]) -> int:
        """The first signal already set the llm's drain deadline and sent Triton SIGTERM (readiness
        false, new requests refused); wait for tritonserver to exit. Triton 2.51 never unloads an
        ensemble that has passed on an error response, so once every stub has unloaded (nothing is
        in flight) it is stopped here instead of at its exit timeout, whose path aborts."""
        deadline = time.monotonic() + self.config.drain_s + 20
        unloaded_at = None
        while self.server.proc.poll() is None and time.monotonic() < deadline and self.signals < 2:
            if stubs and not any(is_running(pid) for pid in stubs):
                unloaded_at = unloaded_at or time.monotonic()
                if time.monotonic() - unloaded_at > 2.0:
                    self.log("every model has unloaded; stopping tritonserver (Triton 2.51 keeps the ensemble)")
                    break
            time.sleep(0.1)
        code = self.server.proc.poll()
        clean = code == 0 or (code is None and unloaded_at is not None and self.signals < 2)
        self._kill()  # the group: stubs left behind, or tritonserver itself
        self.log(f"stopped ({'cleanly' if clean else f'tritonserver exit code {code}'})")
        return 0 if clean else 1


def serve(config: ServerConfig) -> int:
    """Run tritonserver in the foreground under the supervisor; returns its exit code."""
    print(f"serving: HTTP {config.host}:{config.http_port}, gRPC {config.host}:{config.grpc_port}, "
          f"metrics {config.host}:{config.metrics_port}, models {config.model_repository}", flush=True)
    return Supervisor(config).run()
