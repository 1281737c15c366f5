"""The one matrix-product dispatcher the torch runner and the proxy share."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels


def linear(weight, bias=None, *, int8: bool = False, rows: int = 1):
    """x -> x @ weight.T + bias, in the fastest form this machine has, chosen once per weight:
      int8: the weight in int8 (per output channel), activations quantized on the fly (fbgemm's
            dynamic linear; a CPU without native bf16 runs it about twice as fast as fp32);
      a bf16 weight on a CPU with AMX: packed once for kernels.amx_linear at up to AMX_ROWS rows
            (decode: half oneDNN's time at small shapes), F.linear above (prefill, where oneDNN's
            blocking wins and the reorder is small beside the product);
      a bf16 weight on a CPU with AVX-512 BF16 but no AMX: packed once for kernels.dpbf_linear at
            every row count;
      a bf16 weight on other CPUs, or an fp32 one: packed once into oneDNN's blocked layout
            (`rows`: the typical batch), which F.linear would redo on every call;
      anything else: F.linear.
    Each choice and what it gains, measured: docs/benchmarks.md ("The torch runner with packed
    bf16 weights", "AMX matrix products")."""
    if int8:
        w = weight.detach().float().contiguous()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-8).double()
        qweight = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        qbias = None if bias is None else bias.detach().float()
        packed = torch.ops.quantized.linear_prepack(qweight, qbias)
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed)
    if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float32):
        n, k = weight.shape
        if weight.dtype == torch.bfloat16 and n % 16 == 0 and k % 32 == 0 and kernels.amx():  # AMX: our kernel at decode's few rows
            packed, fbias = kernels.pack_amx(weight), None if bias is None else bias.detach().float().contiguous()

            def run(x):
                rows = x.reshape(-1, k)
                if rows.shape[0] > kernels.AMX_ROWS or rows.stride(1) != 1:
                    return F.linear(x, weight, bias)
                return kernels.amx_linear(rows, packed, fbias).view(*x.shape[:-1], n)

            return run
        if weight.dtype == torch.bfloat16 and n % 16 == 0 and k % 2 == 0 and kernels.dpbf():  # AVX-512 BF16, no tiles
            packed, fbias = kernels.pack_dpbf(weight), None if bias is None else bias.detach().float().contiguous()

            def run(x):
                rows = x.reshape(-1, k)
                rows = rows if rows.stride(1) == 1 else rows.contiguous()
                return kernels.dpbf_linear(rows, packed, fbias).view(*x.shape[:-1], n)

            return run
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
            run = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")  # noqa: E731
            run(torch.zeros(1, weight.shape[1], dtype=weight.dtype))  # this build has the op
            return run
        except (AttributeError, RuntimeError):  # no oneDNN (for this dtype) here: plain
            pass
    return lambda x: F.linear(x, weight, bias)
