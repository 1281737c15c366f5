"""Engine configuration: typed, validated once, passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

POLICIES = ("fcfs", "ssjf", "sjf_oracle")
BATCHING = ("none", "dynamic", "continuous")
RUNNERS = ("auto", "torch", "vllm")


@dataclass
class EngineConfig:
    model: str = "smollm2"  # "smollm2" (the packaged default) or an HF folder / hub name
    runner: str = "auto"  # batched generation: "torch" (ours), "vllm" (vLLM's engine), "auto" (vllm where installed)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # "auto" (bf16 where the hardware has it), "bfloat16", "float16", "float32"
    policy: str = "ssjf"
    batching: str = "continuous"
    max_batch_size: int = 16  # running requests (KV-cache slots)
    max_seq_len: int = 2048  # prompt + output tokens per request
    max_prefill_tokens: int = 4096  # prompt tokens admitted in one step
    default_max_tokens: int = 512
    starvation_s: float = 60.0  # aging: a request waiting this long is served next; 0 disables
    max_waiting: int = 512  # waiting requests; beyond this new ones are rejected ("queue full")
    # aging: ... or once later arrivals served ahead of it have held it up, in decode steps, for this
    # many times its own predicted length (its extra wait stays proportional to its size); 0 disables
    max_bypass_ratio: float = 2.0
    max_passes: int = 16  # aging: ... or once this many later arrivals went ahead of it, whatever their size; 0 disables
    cap_by_max_tokens: bool = True  # SSJF key = min(predicted length, max_tokens): no job outlives its max_tokens
    request_timeout_s: float = 600.0  # deadline from arrival unless the client sets a shorter one; 0 disables
    max_prompt_bytes: int = 262144  # larger text_input is rejected before tokenization
    max_engine_restarts: int = 3  # engine-thread crashes survived (in-flight requests fail) before giving up
    chat_template: bool = True  # wrap prompts in the model's chat template
    num_threads: int = 0  # CPU threads for generation; 0: torch runner keeps torch's default, vllm runner takes all cores but one
    enforce_eager: bool = False  # vllm runner: no torch.compile / graph capture (faster start, slower steps)
    kv_cache_gib: float = 4.0  # vllm runner on CPU: memory for its paged KV cache (its own default takes 92%)

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
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        if self.max_passes < 0:
            raise ValueError("max_passes must be >= 0")
        for name in ("max_batch_size", "max_seq_len", "max_prefill_tokens", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("starvation_s", "max_bypass_ratio", "kv_cache_gib", "request_timeout_s", "max_engine_restarts", "max_prompt_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.batching == "none":
            self.max_batch_size = 1

    @classmethod
    def from_strings(cls, params: dict[str, str], environ: dict[str, str] | None = None) -> "EngineConfig":
        """Build from Triton's string parameters; SSJF_POLICY / SSJF_BATCHING / SSJF_DEVICE override."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = params.get(f.name)
            env = environ.get(f"SSJF_{f.name.upper()}")
            if env:
                raw = env
            if raw is None or raw == "":
                continue
            if f.type == "bool":
                values[f.name] = str(raw).lower() in ("1", "true", "yes", "on")
            elif f.type == "int":
                values[f.name] = int(raw)
            elif f.type == "float":
                values[f.name] = float(raw)
            else:
                values[f.name] = str(raw)
        return cls(**values)
