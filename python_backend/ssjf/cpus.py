"""Who runs where on a CPU host.

The engine's batched generation gets the compute cores; everything else (Triton's server and
stubs, the proxy, the response thread) gets the rest. By default that is vLLM's own rule for
its server: all cores this process may use but one go to the engine, the last one to the rest
(a one-core machine shares its core). On CUDA none of this applies.
"""

from __future__ import annotations

import os


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


def bind_process(cpus: set[int]) -> None:
    """Every thread of this process onto cpus (threads started later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that just ended
            pass
