"""tritonclient-based clients for the `ssjf` ensemble."""

from .client import GenerateResult, SSJFClient

__all__ = ["GenerateResult", "SSJFClient"]
