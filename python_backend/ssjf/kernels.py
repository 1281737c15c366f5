"""CPU kernels the torch runner's decode step uses where torch has none as fast.

`decode_attention`: one new token per sequence. It writes each sequence's new K and V into its
cache slot, then attends over that sequence's own live span only (its position + 1 tokens, not
the batch's longest), one pass over K and one over V, every query head of a KV group reading
each cached row once. torch's CPU flash attention, built for long queries, spent twice vLLM's
time here, and index_put's scatter of the new K/V cost as much again as the attention itself.

The source below is compiled once per machine (`-march=native`) with the system C compiler into
the cache directory and loaded with ctypes; it runs on torch's own OpenMP team (torch ships
libgomp, and the library binds to the copy already loaded). Where no compiler is present the
runner keeps torch's kernels (`library()` is None).
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

from .config import cache_dir

log = logging.getLogger(__name__)

# One copy per cache dtype and head size: {name}; {T} the element type and {D} the head size
# (a literal, so the compiler unrolls the dot products, or `head_dim`). GCC vector types of LANES
# floats. Scores take four cached rows at a time, so a dot product's additions run as four
# independent chains instead of one (one chain waits on each add: three times slower).
_BODY = r"""
void attend_{name}(const {T} *q, const {T} *k, const {T} *v, int64_t stride, const float *cos, const float *sin,
                   {T} *k_cache, {T} *v_cache, const int64_t *rows, const int64_t *pos, int64_t B, int64_t H,
                   int64_t G, int64_t head_dim, int64_t S, float scale, {T} *out) {
    const int64_t D = {D}, W = D / LANES;
    for (int64_t b = 0; b < B; b++)  /* the new K (rotated) and V into the cache */
        for (int64_t h = 0; h < H; h++) {
            int64_t dst = ((rows[b] * H + h) * S + pos[b]) * D;
            const {T} *kb = k + b * stride + h * D;
            if (cos) {
                float x[D], y[D];
                for (int64_t d = 0; d < D; d++) x[d] = load_{dtype}(kb[d]);
                rope(x, cos + pos[b] * D, sin + pos[b] * D, y, D);
                for (int64_t d = 0; d < D; d++) k_cache[dst + d] = store_{dtype}(y[d]);
            } else {
                memcpy(k_cache + dst, kb, D * sizeof({T}));
            }
            memcpy(v_cache + dst, v + b * stride + h * D, D * sizeof({T}));
        }
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H, n = pos[b] + 1;
        const {T} *K = k_cache + (rows[b] * H + h) * S * D, *V = v_cache + (rows[b] * H + h) * S * D;
        int64_t n8 = (n + LANES - 1) / LANES * LANES;  /* scores padded to whole vectors, scoring -1e30 */
        float *s = (float *)aligned_alloc(64, sizeof(float) * G * n8);
        for (int64_t i = 0; i < G * n8; i++) s[i] = -1e30f;
        v8f qv[G][W], acc[G][W], kf[4][W];
        for (int64_t g = 0; g < G; g++) {  /* this group's queries, rotated, in fp32 */
            const {T} *qg = q + b * stride + (h * G + g) * D;
            float x[D], y[D];
            for (int64_t d = 0; d < D; d++) x[d] = load_{dtype}(qg[d]);
            if (cos) rope(x, cos + pos[b] * D, sin + pos[b] * D, y, D); else memcpy(y, x, sizeof y);
            for (int64_t j = 0; j < W; j++) qv[g][j] = load8_f32(y + j * LANES);
        }
        for (int64_t t0 = 0; t0 < n; t0 += 4) {
            int64_t m = n - t0 < 4 ? n - t0 : 4;
            for (int64_t i = 0; i < 4; i++)
                for (int64_t j = 0; j < W; j++) kf[i][j] = load8_{dtype}(K + (t0 + (i < m ? i : 0)) * D + j * LANES);
            for (int64_t g = 0; g < G; g++) {
                v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                for (int64_t j = 0; j < W; j++) {
                    v8f x = qv[g][j];
                    a0 += x * kf[0][j]; a1 += x * kf[1][j]; a2 += x * kf[2][j]; a3 += x * kf[3][j];
                }
                float r[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
                for (int64_t i = 0; i < m; i++) s[g * n8 + t0 + i] = r[i] * scale;
            }
        }
        for (int64_t g = 0; g < G; g++) {  /* softmax, a vector at a time over the padded row */
            v8f *sg = (v8f *)(s + g * n8), top = sg[0], total = {0};
            for (int64_t t = 1; t < n8 / LANES; t++) top = max8(top, sg[t]);
            float mx = top[0];
            for (int64_t j = 1; j < LANES; j++) mx = top[j] > mx ? top[j] : mx;
            for (int64_t t = 0; t < n8 / LANES; t++) { sg[t] = exp8(sg[t] - mx); total += sg[t]; }
            v8f inv = (v8f){0} + 1.f / hsum8(total);
            for (int64_t t = 0; t < n8 / LANES; t++) sg[t] *= inv;
        }
        for (int64_t g = 0; g < G; g++) {  /* one query head at a time: its sums stay in registers */
            v8f a[W];
            for (int64_t j = 0; j < W; j++) a[j] = (v8f){0};
            const float *p = s + g * n8;
            for (int64_t t = 0; t < n; t++) {
                v8f w = (v8f){0} + p[t];
                for (int64_t j = 0; j < W; j++) a[j] += w * load8_{dtype}(V + t * D + j * LANES);
            }
            for (int64_t j = 0; j < W; j++) acc[g][j] = a[j];
        }
        {T} *o = out + bh * G * D;
        for (int64_t g = 0; g < G; g++)
            for (int64_t j = 0; j < W; j++)
                for (int64_t l = 0; l < LANES; l++) o[(g * W + j) * LANES + l] = store_{dtype}(acc[g][j][l]);
        free(s);
    }
}
"""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 8  /* 16 (AVX-512) measured slower: the horizontal sums grow */
typedef float v8f __attribute__((vector_size(4 * LANES)));
typedef uint32_t v8u __attribute__((vector_size(4 * LANES)));
typedef int32_t v8i __attribute__((vector_size(4 * LANES)));
typedef uint16_t v8h __attribute__((vector_size(2 * LANES)));

static inline float load_f32(float x) { return x; }
static inline float store_f32(float x) { return x; }
static inline float load_bf16(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}
static inline uint16_t store_bf16(float f) {  /* round to nearest even, as torch's cast */
    union { uint32_t u; float f; } v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}
static inline v8f load8_f32(const float *p) { v8f f; memcpy(&f, p, sizeof f); return f; }
static inline v8f load8_bf16(const uint16_t *p) {
    v8h x; memcpy(&x, p, sizeof x);
    v8u u = __builtin_convertvector(x, v8u) << 16;
    v8f f; memcpy(&f, &u, sizeof f); return f;
}
static inline v8f max8(v8f a, v8f b) { v8i m = a > b; return (v8f)((m & (v8i)a) | (~m & (v8i)b)); }
static inline float hsum8(v8f v) { float t = 0.f; for (int i = 0; i < LANES; i++) t += v[i]; return t; }
/* exp(x) for x <= 0 (softmax after subtracting the max): 2^(x log2 e) by range reduction and a
   degree-6 polynomial, relative error ~1e-7, branch-free so that it vectorizes */
static inline v8f exp8(v8f x) {
    x = max8(x, (v8f){0} - 87.f);
    v8f y = x * 1.44269504089f;
    v8i k = __builtin_convertvector(y, v8i);  /* toward zero; one less where that rounded up */
    k += (v8i)(__builtin_convertvector(k, v8f) > y);
    v8f f = (y - __builtin_convertvector(k, v8f)) * 0.69314718056f;
    v8f p = 1.f + f * (1.f + f * (0.5f + f * (0.166666672f + f * (0.0416666418f + f * (0.00833336077f
            + f * 0.00138888889f)))));
    return p * (v8f)((k + 127) << 23);
}
/* rotary embedding, Llama's "rotate half" form: y = x cos + (-x2, x1) sin */
static inline void rope(const float *x, const float *cos, const float *sin, float *y, int64_t D) {
    int64_t half = D / 2;
    for (int64_t d = 0; d < half; d++) y[d] = x[d] * cos[d] - x[d + half] * sin[d];
    for (int64_t d = half; d < D; d++) y[d] = x[d] * cos[d] + x[d - half] * sin[d];
}
"""
DTYPES = {"bf16": "uint16_t", "f32": "float"}
HEAD_DIMS = ("64", "128", "any")  # "any": a multiple of LANES, known at run time
KERNELS = [f"attend_{dtype}_{d}" for dtype in DTYPES for d in HEAD_DIMS]
for _dtype, _t in DTYPES.items():
    for _d in HEAD_DIMS:
        SOURCE += (_BODY.replace("{name}", f"{_dtype}_{_d}").replace("{dtype}", _dtype).replace("{T}", _t)
                   .replace("{D}", "head_dim" if _d == "any" else _d))
LANES = 8

FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared"]


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (a second or two) and reused from the cache
    directory after; None where there is no C compiler or the build fails."""
    import torch  # its libgomp first, so the library binds to it

    from .cpus import cpu_flags

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler: the torch runner keeps torch's attention")
        return None
    key = hashlib.sha256("\n".join([SOURCE, *FLAGS, " ".join(sorted(cpu_flags())), torch.__version__]).encode())
    path = cache_dir() / "kernels" / f"decode-{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            src, lib = os.path.join(tmp, "decode.c"), os.path.join(tmp, "decode.so")
            with open(src, "w") as f:
                f.write(SOURCE)
            done = subprocess.run([compiler, *FLAGS, src, "-o", lib], capture_output=True, text=True)
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


def supports(k_cache) -> bool:
    """The kernels apply to this cache: a contiguous bf16 or fp32 CPU tensor whose head size is a
    multiple of LANES, and they built."""
    import torch

    return (k_cache.device.type == "cpu" and k_cache.dtype in (torch.bfloat16, torch.float32)
            and k_cache.is_contiguous() and k_cache.shape[-1] % LANES == 0 and library() is not None)
