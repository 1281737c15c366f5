"""What this machine runs natively, and who runs where on a CPU host.

Dtypes: bf16 only where the hardware computes it (AVX512-BF16 or AMX on x86, a CUDA device with
bf16), else fp32; elsewhere bf16 is emulated and several times slower than fp32.

The engine's batched generation gets the compute cores; everything else (Triton's server and
stubs, the proxy, the response thread) gets the rest. By default that is vLLM's own rule for
its server: all cores this process may use but one go to the engine, the last one to the rest
(a one-core machine shares its core). On CUDA none of this applies.
"""

from __future__ import annotations

import functools
import logging
import os

ISA = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def native_bf16() -> bool:
    """The CPU computes bf16 in hardware (avx512_bf16, amx_bf16; aarch64's bf16 / sve's)."""
    flags = cpu_flags()
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16", "svebf16"})
    import torch  # no /proc/cpuinfo: ask oneDNN

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str, device="cpu"):
    """A dtype name to a torch dtype; "auto": bf16 where the hardware runs it natively, else fp32
    on CPU and fp16 on GPUs without bf16. An explicit name always wins."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if native_bf16() else torch.float32


def machine() -> dict:
    """What a benchmark report records: CPU model, the ISA flags that decide dtypes, cores, threads, GPU."""
    import torch

    info = {"threads": torch.get_num_threads(), "cores": len(allowed())}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["isa"] = [f for f in ISA if f in cpu_flags()]
    info["auto_dtype_cpu"] = str(resolve_dtype("auto", "cpu")).removeprefix("torch.")
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def allowed() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def engine_cpus(num_threads: int = 0) -> set[int]:
    """num_threads cores if set, else every allowed core but the last."""
    cores = allowed()
    n = num_threads or max(1, len(cores) - 1)
    return set(cores[: min(n, len(cores))])


def service_cpus() -> set[int]:
    """The cores left when the engine has its default share (the last one, or the only one)."""
    cores = allowed()
    return set(cores[len(engine_cpus()):]) or set(cores)


class EngineThreads:
    """The engine's compute cores (engine_cpus), bound to the thread that steps the runner: its
    OpenMP team then runs on them, off the core left to Triton, the proxy and the responder.
    OpenMP's thread count is per thread, so this happens once per stepping thread, at its first
    step. None on CUDA."""

    def __init__(self, num_threads: int, device: str = "cpu"):
        import threading

        self.cpus = engine_cpus(num_threads) if str(device).startswith("cpu") else None
        self._bound: int | None = None
        self._ident = threading.get_ident

    def bind(self, who: str = "engine") -> bool:
        """Bind the calling thread once; True when it was bound now."""
        if self.cpus is None or self._bound == self._ident():
            return False
        import torch

        try:
            os.sched_setaffinity(0, self.cpus)  # this thread; the team it forks inherits it
        except OSError:
            pass
        torch._C.set_num_threads(len(self.cpus))  # vLLM replaces torch.set_num_threads with a no-op
        self._bound = self._ident()
        logging.getLogger(__name__).info("%s: engine thread on cpus %s, %d threads", who, sorted(self.cpus), len(self.cpus))
        return True


def bind_process(cpus: set[int]) -> None:
    """Every thread of this process onto cpus (threads started later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that just ended
            pass


def place_proxy(num_threads: str, device: str = "cpu") -> None:
    """The proxy's process and threads (ProxyConfig.num_threads): "auto" on a CPU host binds it to
    the cores the engine leaves free, with one thread each; a number sets that many threads."""
    import torch

    if num_threads == "auto" and device == "cpu":
        cpus = service_cpus()
        bind_process(cpus)
        torch.set_num_threads(len(cpus))
    elif num_threads != "auto" and int(num_threads) > 0:
        torch.set_num_threads(int(num_threads))
