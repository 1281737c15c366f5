"""CPU kernels the torch runner's decode step uses where torch has none as fast.

`decode_attention`: one new token per sequence. It writes each sequence's new K and V into its
cache slot, then attends over that sequence's own live span only (its position + 1 tokens, not
the batch's longest), one pass over K and one over V, every query head of a KV group reading
each cached row once. torch's CPU flash attention, built for long queries, spent twice vLLM's
time here, and index_put's scatter of the new K/V cost as much again as the attention itself.

The C (decode.c and its headers here) is compiled once per machine (`-march=native`) with the
system C compiler into the cache directory and loaded with ctypes; it runs on torch's own OpenMP team (torch ships
libgomp, and the library binds to the copy already loaded). Where no compiler is present the
runner keeps torch's kernels (`library()` is None). `linear.py` picks, per weight, the fastest
matrix product this machine has (these kernels, oneDNN's packed layout, or int8), for the torch
runner and the proxy alike.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..config import cache_dir

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
# The C, one translation unit: decode.c includes a header per kernel family (package data beside
# this file), each variant (cache dtype, head size) made by macros. Their text is the build's key.
SOURCES = ("decode.c", "common.h", "attention.h", "pointwise.h", "amx.h", "dpbf.h")
DTYPES = ("bf16", "f32")  # the cache dtypes decode.c makes variants for
HEAD_DIMS = ("64", "128", "any")  # "any": a multiple of LANES, known at run time
KERNELS = [f"attend_{dtype}_{d}" for dtype in DTYPES for d in HEAD_DIMS]
LANES = 8


def _name(dtype) -> str:
    """The kernels' name for a torch dtype."""
    import torch

    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float32:
        return "f32"
    raise ValueError(f"the kernels run bf16 or fp32, not {dtype}")


FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-lm"]


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (a second or two) and reused from the cache
    directory after; None where there is no C compiler or the build fails."""
    import torch  # its libgomp first, so the library binds to it

    from ..cpus import cpu_flags

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler: the torch runner keeps torch's attention")
        return None
    source = "\n".join((HERE / name).read_text() for name in SOURCES)
    key = hashlib.sha256("\n".join([source, *FLAGS, " ".join(sorted(cpu_flags())), torch.__version__]).encode())
    path = cache_dir() / "kernels" / f"decode-{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            lib = os.path.join(tmp, "decode.so")
            done = subprocess.run([compiler, *FLAGS, "-I", str(HERE), str(HERE / "decode.c"), "-o", lib],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                log.warning("building the decode kernels failed; torch's attention stays:\n%s", done.stderr[-2000:])
                return None
            os.replace(lib, path)  # atomic: servers starting together each build, one wins
    lib = ctypes.CDLL(str(path))
    for name in KERNELS:
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5
                      + [ctypes.c_float, ctypes.c_void_p])
    for dtype in DTYPES:
        fn = getattr(lib, f"add_rmsnorm_{dtype}")
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_float] + [ctypes.c_void_p] + [ctypes.c_int64] * 2
        fn = getattr(lib, f"silu_mul_{dtype}")
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    for name in ("amx", "dpbf"):
        getattr(lib, f"{name}_ready").restype = ctypes.c_int
        fn = getattr(lib, f"{name}_linear")
        fn.restype = None
        fn.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64]
                       + [ctypes.c_void_p] * 2 + [ctypes.c_int64])
    return lib


def decode_attention(qkv, q_heads: int, k_cache, v_cache, rows, pos, scale: float, rope=None):
    """One decode step's attention for one layer. qkv [B, (q_heads + 2 * kv_heads) * D]: the fused
    projection's output (queries grouped by KV head, then keys, then values), in the cache's dtype.
    With rope = (cos, sin), fp32 tables [positions, D], queries and keys are rotated at pos first.
    Writes each row's K and V at (rows[b], :, pos[b]) of this layer's cache [slots, kv_heads, S, D],
    then attends over its first pos[b] + 1 positions. Returns [B, q_heads * D] in the cache's dtype."""
    import torch

    lib = library()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape):
        raise ValueError("decode_attention needs one layer's contiguous K and V caches of one shape")
    _, kv_heads, max_len, d = k_cache.shape
    b = qkv.shape[0]
    qkv = qkv.reshape(b, -1)
    if qkv.dtype != k_cache.dtype or qkv.stride(-1) != 1 or qkv.shape[1] != (q_heads + 2 * kv_heads) * d:
        raise ValueError(f"qkv must be [B, {(q_heads + 2 * kv_heads) * d}] in {k_cache.dtype}, rows contiguous")
    if d % LANES or q_heads % kv_heads:
        raise ValueError(f"head size {d} is not a multiple of {LANES}, or {q_heads} query heads do not group")
    if rows.dtype != torch.long or pos.dtype != torch.long:
        raise ValueError("rows and pos must be int64")
    rows, pos = rows.contiguous(), pos.contiguous()
    fn = getattr(lib, f"attend_{'bf16' if k_cache.dtype == torch.bfloat16 else 'f32'}_{d if d in (64, 128) else 'any'}")
    out = torch.empty(b, q_heads * d, dtype=k_cache.dtype)
    q = qkv.data_ptr()
    size = qkv.element_size()
    cos, sin = (None, None) if rope is None else (rope[0].data_ptr(), rope[1].data_ptr())
    fn(q, q + q_heads * d * size, q + (q_heads + kv_heads) * d * size, qkv.stride(0), cos, sin, k_cache.data_ptr(),
       v_cache.data_ptr(), rows.data_ptr(), pos.data_ptr(), b, kv_heads, q_heads // kv_heads, d, max_len, scale,
       out.data_ptr())
    return out


def add_rmsnorm(x, delta, weight, eps: float, out):
    """x += delta (where delta is not None), then out = weight * rmsnorm(x), as Llama's RMSNorm
    computes it (in fp32, rounded to x's dtype before the weight). x, delta, out [B, N] contiguous
    CPU tensors in weight's dtype, weight [N], N a multiple of LANES; x is updated in place.
    Returns out. (Checked on every call, cheaply: the decode step makes 2 per layer.)"""
    name, n, rows = _name(weight.dtype), weight.shape[0], x.shape[0]
    for t, what in ((x, "x"), (out, "out"), (delta, "delta"), (weight, "weight")):
        if t is not None and not (t.is_cpu and t.is_contiguous() and t.dtype == weight.dtype
                                  and t.shape == ((n,) if what == "weight" else (rows, n))):
            raise ValueError(f"{what} must be a contiguous CPU tensor in {weight.dtype} shaped "
                             f"{[n] if what == 'weight' else [rows, n]}; got {list(t.shape)} {t.dtype}")
    if n % LANES:
        raise ValueError(f"the width {n} is not a multiple of {LANES}")
    getattr(library(), f"add_rmsnorm_{name}")(x.data_ptr(), None if delta is None else delta.data_ptr(),
                                              weight.data_ptr(), eps, out.data_ptr(), rows, n)
    return out


def silu_mul(gate_up):
    """SiLU(gate) * up for gate_up = [gate | up] ([B, 2I], rows contiguous): [B, I] in its dtype."""
    import torch

    name = _name(gate_up.dtype)
    if not (gate_up.is_cpu and gate_up.dim() == 2 and gate_up.stride(1) == 1):
        raise ValueError(f"gate_up must be a CPU [B, 2I] tensor with contiguous rows; got {list(gate_up.shape)}")
    if gate_up.shape[1] % (2 * LANES):
        raise ValueError(f"gate_up's width must be a multiple of {2 * LANES}, got {gate_up.shape[1]}")
    b, i = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(b, i, dtype=gate_up.dtype)
    getattr(library(), f"silu_mul_{name}")(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), b, i)
    return out


def supports(k_cache) -> bool:
    """The kernels apply to this cache: a contiguous bf16 or fp32 CPU tensor whose head size is a
    multiple of LANES, and they built."""
    import torch

    return (k_cache.device.type == "cpu" and k_cache.dtype in (torch.bfloat16, torch.float32)
            and k_cache.is_contiguous() and k_cache.shape[-1] % LANES == 0 and library() is not None)


AMX_ROWS = 128  # above this many rows oneDNN's blocking wins (prefill); at or below, amx_linear


def amx() -> bool:
    """The kernels built with AMX's bf16 tiles and the kernel granted them to this process."""
    lib = library()
    return lib is not None and lib.amx_ready() == 1


def pack_amx(weight):
    """A bf16 weight [N, K] (N % 16 == 0, K % 32 == 0) in amx_linear's layout: groups of up to four
    16-column blocks, each group K / 32 slices of its blocks' VNNI tiles (pairs of K adjacent).
    Shaped [N, K] still, so that the product's sizes come with it (its rows are not W's rows)."""
    import torch

    n, k = weight.shape
    if weight.dtype.itemsize != 2 or n % 16 or k % 32:
        raise ValueError(f"pack_amx takes a bf16 [N, K] weight with N % 16 == 0 and K % 32 == 0, got {list(weight.shape)}")
    tiles = weight.detach().reshape(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4)  # block, slice, pair, col, 2
    groups = [tiles[b : b + 4].transpose(0, 1).reshape(-1) for b in range(0, n // 16, 4)]
    return torch.cat(groups).view(n, k)


def pack_dpbf(weight):
    """A bf16 weight [N, K] (N % 16 == 0, K even) in dpbf_linear's layout: groups of up to four
    16-column blocks, each group K / 2 runs of its blocks' vectors for one pair of K (16 columns x
    2), side by side, so that a group streams from memory in order. Shaped [N, K] still."""
    import torch

    n, k = weight.shape
    if weight.dtype.itemsize != 2 or n % 16 or k % 2:
        raise ValueError(f"pack_dpbf takes a bf16 [N, K] weight with N % 16 == 0 and K even, got {list(weight.shape)}")
    pairs = weight.detach().reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3)  # block, pair, col, 2
    groups = [pairs[b : b + 4].transpose(0, 1).reshape(-1) for b in range(0, n // 16, 4)]
    return torch.cat(groups).view(n, k)


def dpbf() -> bool:
    """The kernels built with AVX-512 BF16's dot products (dpbf_linear)."""
    lib = library()
    return lib is not None and lib.dpbf_ready() == 1


def amx_linear(x, packed, bias=None):
    """x [M, K] (rows contiguous, bf16) @ W.T (+ bias, fp32 [N]) for W [N, K] packed by pack_amx: [M, N] bf16."""
    return _packed_product("amx_linear", x, packed, bias)


def dpbf_linear(x, packed, bias=None):
    """amx_linear's product on AVX-512 BF16 (VDPBF16PS), for W [N, K] packed by pack_dpbf."""
    return _packed_product("dpbf_linear", x, packed, bias)


def _packed_product(name: str, x, packed, bias):
    import torch

    (m, k), n = x.shape, packed.shape[0]
    if x.dtype != torch.bfloat16 or x.stride(1) != 1 or packed.shape[1] != k:
        raise ValueError(f"{name}: x {list(x.shape)} ({x.dtype}) does not match a packed {list(packed.shape)} weight")
    y = torch.empty(m, n, dtype=x.dtype)
    getattr(library(), name)(x.data_ptr(), x.stride(0), m, k, packed.data_ptr(), n,
                             None if bias is None else bias.data_ptr(), y.data_ptr(), n)
    return y
