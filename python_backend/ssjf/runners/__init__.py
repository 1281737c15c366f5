"""Batched generation behind one seam (base.py): `torch`, our own forward pass (runners/torch),
and `vllm`, vLLM's engine stepped from our engine thread (vllm.py). Each is imported only when
chosen, so a server on one never loads the other's dependencies."""

from __future__ import annotations

from ..config import EngineConfig
from .base import Runner


def make_runner(config: EngineConfig) -> Runner:
    """The runner config.runner names."""
    if config.runner == "torch":
        from .torch.runner import ModelRunner

        return ModelRunner(config)
    if config.runner == "vllm":
        from .vllm import VllmRunner

        return VllmRunner(config)
    raise ValueError(f"unknown runner {config.runner!r}")
