"""Every setting, its default and the environment variable that overrides it, in one module.

No other module reads the environment. The names, one namespace per thing configured:
  SSJF_<FIELD>        EngineConfig, the llm model (SSJF_POLICY, SSJF_MAX_BATCH_SIZE, SSJF_MODEL = the LLM)
  SSJF_PROXY_<FIELD>  ProxyConfig, the length_predictor model (SSJF_PROXY_ARTIFACT, ...)
  HTTP_PORT, GRPC_PORT, METRICS_PORT, SSJF_HOST, SSJF_MODEL_REPOSITORY, SSJF_ADMIN_KEY: ServerConfig
  SSJF_CACHE_DIR      where prepared models, Triton's backend folder and trained artifacts go
  SSJF_LOAD_<FIELD>   the Locust load test's settings (loadtest/locustfile.py; SSJF_LOAD_MODEL = a Triton model)
Triton parameters in a model's config.pbtxt sit under the environment: `from_strings` takes
the parameters, then the environment wins.
"""

from __future__ import annotations

import os
import random
import secrets
import socket
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

POLICIES = ("fcfs", "ssjf", "sjf_oracle", "ssrpt", "srpt_oracle")
PREEMPTIVE = ("ssrpt", "srpt_oracle")
BATCHING = ("none", "dynamic", "continuous")
RUNNERS = ("auto", "torch", "vllm")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def setting(default=MISSING, help: str = "", env: str = "", factory=MISSING):
    """A dataclass field with its help text (command-line flags, `ssjf settings` and docs read it)
    and, for a setting read from the environment under a name of its own, that name."""
    metadata = {"help": help, **({"env": env} if env else {})}
    return field(default=default, default_factory=factory, metadata=metadata)


def _convert(kind: str, raw: str):
    if kind == "Path":
        return Path(raw)
    if kind == "bool":
        return str(raw).lower() in ("1", "true", "yes", "on")
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    return str(raw)


def from_strings(cls, params: dict[str, str], environ: dict[str, str] | None, prefix: str):
    """A settings dataclass from string parameters, each overridden by `<prefix><FIELD>` in environ."""
    environ = os.environ if environ is None else environ
    values = {}
    for f in fields(cls):
        raw = environ.get(f.metadata.get("env") or f"{prefix}{f.name.upper()}") or params.get(f.name)
        if raw is not None and raw != "":
            values[f.name] = _convert(str(f.type), raw)
    return cls(**values)


def help_of(cls, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


def default_of(cls, name: str):
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def cache_dir(environ: dict[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get("SSJF_CACHE_DIR") or Path.home() / ".cache" / "ssjf")


def refresh_path(configured: str = "") -> Path:
    """The proxy correction's file: one per cache directory unless set (two servers with different
    artifacts sharing a cache directory set their own; a file of another feature width is ignored)."""
    return Path(configured) if configured else cache_dir() / "refresh" / "proxy.npz"


@dataclass
class EngineConfig:
    model: str = setting("smollm2", "the LLM: smollm2 (the packaged SmolLM2-135M-Instruct) or an HF folder / hub name")
    runner: str = setting("auto", "batched generation: torch (ours), vllm (vLLM's engine), auto (vllm where installed)")
    device: str = setting("cpu", "cpu, cuda, cuda:1, ...")
    dtype: str = setting("auto", "auto (bf16 where the hardware runs it natively, else fp32), bfloat16, float16, float32")
    policy: str = setting("ssjf", "queue order: fcfs, ssjf (shortest predicted first), sjf_oracle (true length), "
                                  "ssrpt (shortest expected remaining, re-ranked as jobs run, with bounded "
                                  "preemption), srpt_oracle (true remaining)")
    batching: str = setting("continuous", "none, dynamic (request-level batches), continuous (join and leave per step)")
    max_batch_size: int = setting(16, "running requests (KV-cache slots)")
    max_seq_len: int = setting(2048, "prompt + output tokens per request")
    max_prefill_tokens: int = setting(4096, "padded prompt tokens admitted in one step")
    default_max_tokens: int = setting(512, "max_tokens when the client sends none (clamped to the context)")
    starvation_s: float = setting(60.0, "aging: a request waiting this long is served next; 0 disables")
    max_waiting: int = setting(512, "waiting requests; beyond this new ones get a 'queue full' error")
    max_bypass_ratio: float = setting(
        2.0, "aging: ... or once later arrivals served ahead of it held it up, in decode steps, for this many "
             "times its own predicted length; 0 disables")
    max_passes: int = setting(16, "aging: ... or once this many later arrivals went ahead of it; 0 disables")
    preempt_margin: float = setting(8.0, "ssrpt: a running job gives its place to a waiting one expected to need this "
                                         "many times fewer tokens than it still needs; 0 disables preemption")
    preempt_max_fraction: float = setting(0.5, "ssrpt: a job past this fraction of its expected length is not preempted")
    max_preemptions: int = setting(1, "ssrpt: times one job may be preempted (each counts as a pass for the guard)")
    preempt_min_tau: float = setting(0.1, "ssrpt: preempt only while the predictions rank the last finished requests "
                                          "at least this well (Kendall tau over up to 200, once 20 finished); 0: always")
    park_slots: int = setting(4, "ssrpt, torch runner: KV-cache slots beyond the batch where a preempted job keeps "
                                 "its cache and resumes without a prefill (each a batch slot's size); 0: prefilled again")
    length_sigma: float = setting(0.8, "ssrpt: the starting spread of log(true / predicted) length; learned as it serves")
    cap_by_max_tokens: bool = setting(True, "SSJF key = min(predicted length, max_tokens); off: the prediction alone")
    request_timeout_s: float = setting(600.0, "deadline from arrival unless the client sets a shorter one; 0 disables")
    max_prompt_bytes: int = setting(262144, "larger text_input is refused before tokenization")
    max_engine_restarts: int = setting(3, "engine-loop crashes survived (in-flight requests fail) before giving up")
    exit_on_engine_death: bool = setting(True, "stop tritonserver when the engine gives up, so it is replaced")
    chat_template: bool = setting(True, "wrap prompts in the model's chat template")
    num_threads: int = setting(0, "CPU cores for generation, bound to the engine thread; 0: all but one (the last "
                                  "serves Triton, the proxy and the sends)")
    decode_kernels: bool = setting(True, "torch runner on CPU: the built decode kernels (attention with rotary, "
                                         "residual add + RMSNorm, SiLU(gate) * up; needs a C compiler; off: torch's ops)")
    cuda_graphs: bool = setting(True, "torch runner on CUDA: decode steps replayed from CUDA graphs, one per "
                                      "batch-size bucket (captured at first use)")
    enforce_eager: bool = setting(False, "vllm runner: no torch.compile or graph capture (faster start, slower steps)")
    tensor_parallel_size: int = setting(1, "vllm runner: GPUs each layer is split over (vLLM's own workers run them)")
    pipeline_parallel_size: int = setting(1, "vllm runner: GPUs the layers are staged over; the server uses "
                                             "tensor x pipeline GPUs")
    kv_cache_gib: float = setting(4.0, "vllm runner on CPU: memory for its paged KV cache (its own default takes 92%)")
    drain_file: str = setting("", "graceful shutdown: when this file appears (ssjf serve writes it on SIGTERM, with "
                                  "the drain deadline in it) admit nothing more and end what is left by the deadline")

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.batching not in BATCHING:
            raise ValueError(f"unknown batching {self.batching!r}; choose one of {', '.join(BATCHING)}")
        if self.runner not in RUNNERS:
            raise ValueError(f"unknown runner {self.runner!r}; choose one of {', '.join(RUNNERS)}")
        if self.runner == "auto":
            import importlib.util

            self.runner = "vllm" if importlib.util.find_spec("vllm") is not None else "torch"
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        if self.max_passes < 0:
            raise ValueError("max_passes must be >= 0")
        if self.preempt_margin < 0 or self.max_preemptions < 0 or not 0 <= self.preempt_max_fraction <= 1:
            raise ValueError("preempt_margin and max_preemptions must be >= 0, preempt_max_fraction in [0, 1]")
        if self.length_sigma <= 0:
            raise ValueError("length_sigma must be > 0")
        for name in ("max_batch_size", "max_seq_len", "max_prefill_tokens", "default_max_tokens",
                     "tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("starvation_s", "max_bypass_ratio", "park_slots", "kv_cache_gib", "request_timeout_s", "max_engine_restarts",
                     "max_prompt_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.batching == "none":
            self.max_batch_size = 1

    @classmethod
    def from_strings(cls, params: dict[str, str], environ: dict[str, str] | None = None) -> "EngineConfig":
        """From the llm's config.pbtxt parameters; SSJF_<FIELD> in the environment overrides each."""
        return from_strings(cls, params, environ, "SSJF_")


@dataclass
class ProxyConfig:
    artifact: str = setting("smollm2", "smollm2: SmolLM2's own lengths; recorded: the datasets' (trace replay); or a .npz")
    device: str = setting("cpu", "cpu or cuda")
    dtype: str = setting("auto", "the encoder's: auto (bf16 where the hardware computes it natively, else int8 matrix "
                                 "products on CPU for MiniLM, else fp32), bfloat16, float32, int8")
    num_threads: str = setting("auto", "auto: on CPU, the cores the LLM engine leaves free; a number: that many threads")

    def __post_init__(self):
        if self.dtype not in DTYPES + ("int8",):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.num_threads != "auto" and not str(self.num_threads).isdigit():
            raise ValueError(f"num_threads: auto or a number, got {self.num_threads!r}")

    @classmethod
    def from_strings(cls, params: dict[str, str], environ: dict[str, str] | None = None) -> "ProxyConfig":
        """From the length_predictor's parameters; SSJF_PROXY_<FIELD> overrides each."""
        return from_strings(cls, params, environ, "SSJF_PROXY_")


@dataclass
class RefreshConfig:
    """The proxy refresh, which both models read: the llm learns a correction to the proxy's head
    from finished requests' true lengths and writes it to `path`; the length_predictor applies it.
    A config.pbtxt parameter `proxy_refresh_<NAME>` (`proxy_refresh` for `enabled`) sets one;
    SSJF_PROXY_REFRESH_<NAME> (SSJF_PROXY_REFRESH) in the environment overrides it."""

    enabled: bool = setting(True, "learn and apply a correction to the proxy's head from served requests' true lengths",
                            env="SSJF_PROXY_REFRESH")
    window: int = setting(4000, "the recent finished requests it learns from (one row of proxy features each: "
                                "6 MiB for MiniLM's, 9 MiB for SmolLM2's)")
    interval_s: float = setting(30.0, "seconds between refits")
    min_rows: int = setting(64, "finished requests needed before the first refit")
    path: str = setting("", "the correction file (the llm writes it, the proxy reads it); "
                            "empty: $SSJF_CACHE_DIR/refresh/proxy.npz")

    @classmethod
    def from_strings(cls, params: dict[str, str], environ: dict[str, str] | None = None) -> "RefreshConfig":
        mine = {("enabled" if k == "proxy_refresh" else k.removeprefix("proxy_refresh_")): v
                for k, v in params.items() if k.startswith("proxy_refresh")}
        return from_strings(cls, mine, environ, "SSJF_PROXY_REFRESH_")

    @property
    def file(self) -> Path:
        return refresh_path(self.path)


def admin_key(environ: dict[str, str] | None = None) -> str:
    """SSJF_ADMIN_KEY_FILE's content, else SSJF_ADMIN_KEY, else a random key that locks the admin APIs."""
    environ = os.environ if environ is None else environ
    if environ.get("SSJF_ADMIN_KEY_FILE"):
        return Path(environ["SSJF_ADMIN_KEY_FILE"]).read_text().strip()
    return environ.get("SSJF_ADMIN_KEY") or secrets.token_hex(16)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that are free on host right now, chosen below the kernel's ephemeral range.
    The server binds them only after its models load, and in between the vllm runner (vLLM opens a
    socket on a free ephemeral port when its engine starts), any outgoing connection, or another
    server's start may take an ephemeral port: Triton then failed to bind its metrics port and
    stopped serving gRPC. Below the range nothing is handed out by chance."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    ports: list[int] = []
    for _ in range(200 * n):
        if len(ports) == n:
            return ports
        port = rng.randrange(10000, max(low, 10001 + n))
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        ports.append(port)
    socks = [socket.socket() for _ in range(n - len(ports))]  # below the range is crowded: any free ones
    for s in socks:
        s.bind((host, 0))
    ports += [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class ServerConfig:
    """tritonserver's and `ssjf serve`'s settings, each read from the environment variable its
    field names (from_env); `ssjf settings` prints them."""

    http_port: int = setting(8000, "Triton's HTTP port (behind ssjf serve's gate)", env="HTTP_PORT")
    grpc_port: int = setting(8001, "Triton's gRPC port", env="GRPC_PORT")
    metrics_port: int = setting(8002, "Triton's Prometheus metrics port", env="METRICS_PORT")
    host: str = setting("127.0.0.1", "the address every port binds to", env="SSJF_HOST")
    model_repository: Path = setting(help="Triton's model repository", env="SSJF_MODEL_REPOSITORY",
                                     factory=lambda: Path("model_repository").resolve())
    log_verbose: int = setting(0, "Triton's --log-verbose")
    # Admin APIs answer only requests carrying the header `ssjf-admin-key: <key>`; with no key
    # configured a random one is drawn, which locks them for everyone.
    admin_key: str = setting(help="SSJF_ADMIN_KEY_FILE's content, else SSJF_ADMIN_KEY, else random", factory=admin_key)
    extra_args: list[str] = setting(help="more tritonserver arguments", factory=list)
    http_host: str = setting("", "where Triton's HTTP binds, if not `host` (behind the gate: loopback)")
    # ssjf serve's supervision (the tests' TritonServer runs tritonserver bare)
    drain_s: float = setting(30.0, "on SIGTERM, in-flight requests get this long to finish", env="SSJF_DRAIN_S")
    http_gate: bool = setting(True, "the public HTTP port is ssjf.gate in front of Triton's", env="SSJF_HTTP_GATE")
    max_body_bytes: int = setting(1 << 20, "the gate's body limit", env="SSJF_MAX_BODY_BYTES")
    max_json_depth: int = setting(32, "the gate's JSON nesting limit", env="SSJF_MAX_JSON_DEPTH")
    max_restarts: int = setting(10, "tritonserver restarts after a dead stub or an unexpected exit",
                                env="SSJF_MAX_RESTARTS")
    openai_port: int = setting(9000, "the OpenAI-compatible API (ssjf.openai_api); 0: off", env="OPENAI_PORT")

    @classmethod
    def on_free_ports(cls, **kw) -> "ServerConfig":
        http, grpc, metrics = free_ports(3)
        return cls(http_port=http, grpc_port=grpc, metrics_port=metrics, **kw)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "ServerConfig":
        environ = os.environ if environ is None else environ
        values = {f.name: _convert(str(f.type), environ[f.metadata["env"]]) for f in fields(cls)
                  if f.metadata.get("env") and environ.get(f.metadata["env"])}
        return cls(admin_key=admin_key(environ), **values)


def load_settings(cls, environ: dict[str, str] | None = None):
    """The load test's settings (a dataclass of the locustfile's) from SSJF_LOAD_<FIELD>."""
    return from_strings(cls, {}, environ, "SSJF_LOAD_")
