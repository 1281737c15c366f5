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

# One copy per cache dtype: {name}, {T} the element type, {LOAD}(x) to fp32, {STORE}(x) from fp32.
_BODY = r"""
void attend_{name}(const float *q, const {T} *k_new, const {T} *v_new, {T} *k_cache, {T} *v_cache,
                   const int64_t *rows, const int64_t *pos, int64_t B, int64_t H, int64_t G, int64_t head_dim,
                   int64_t S, float scale, {T} *out) {
    const int64_t D = head_dim;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            int64_t dst = ((rows[b] * H + h) * S + pos[b]) * D;
            memcpy(k_cache + dst, k_new + (b * H + h) * D, D * sizeof({T}));
            memcpy(v_cache + dst, v_new + (b * H + h) * D, D * sizeof({T}));
        }
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H, n = pos[b] + 1;
        const {T} *K = k_cache + (rows[b] * H + h) * S * D, *V = v_cache + (rows[b] * H + h) * S * D;
        const float *qb = q + bh * G * D;
        float *s = (float *)malloc(sizeof(float) * (G * n + G * D));
        float *acc = s + G * n;
        float row[D];
        for (int64_t t = 0; t < n; t++) {
            const {T} *kt = K + t * D;
            #pragma omp simd
            for (int64_t d = 0; d < D; d++) row[d] = {LOAD}(kt[d]);
            for (int64_t g = 0; g < G; g++) {
                const float *qg = qb + g * D;
                float dot = 0.f;
                #pragma omp simd reduction(+:dot)
                for (int64_t d = 0; d < D; d++) dot += qg[d] * row[d];
                s[g * n + t] = dot * scale;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float *sg = s + g * n, top = sg[0], total = 0.f;
            for (int64_t t = 1; t < n; t++) top = sg[t] > top ? sg[t] : top;
            #pragma omp simd reduction(+:total)
            for (int64_t t = 0; t < n; t++) { sg[t] = exp_approx(sg[t] - top); total += sg[t]; }
            float inv = 1.f / total;
            #pragma omp simd
            for (int64_t t = 0; t < n; t++) sg[t] *= inv;
        }
        memset(acc, 0, sizeof(float) * G * D);
        for (int64_t t = 0; t < n; t++) {
            const {T} *vt = V + t * D;
            #pragma omp simd
            for (int64_t d = 0; d < D; d++) row[d] = {LOAD}(vt[d]);
            for (int64_t g = 0; g < G; g++) {
                float p = s[g * n + t], *ag = acc + g * D;
                #pragma omp simd
                for (int64_t d = 0; d < D; d++) ag[d] += p * row[d];
            }
        }
        {T} *o = out + bh * G * D;
        for (int64_t i = 0; i < G * D; i++) o[i] = {STORE}(acc[i]);
        free(s);
    }
}
"""

# The same, for head sizes known at build time (a multiple of 16): GCC vector types of LANES floats.
# Scores take four cached rows at a time, so a dot product's additions run as four independent
# chains instead of one (one chain waits on each add: three times slower).
_FAST = r"""
void attend_{name}(const float *q, const {T} *k_new, const {T} *v_new, {T} *k_cache, {T} *v_cache,
                   const int64_t *rows, const int64_t *pos, int64_t B, int64_t H, int64_t G, int64_t head_dim,
                   int64_t S, float scale, {T} *out) {
    enum { D = {D}, W = {D} / LANES };
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            int64_t dst = ((rows[b] * H + h) * S + pos[b]) * D;
            memcpy(k_cache + dst, k_new + (b * H + h) * D, D * sizeof({T}));
            memcpy(v_cache + dst, v_new + (b * H + h) * D, D * sizeof({T}));
        }
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H, n = pos[b] + 1;
        const {T} *K = k_cache + (rows[b] * H + h) * S * D, *V = v_cache + (rows[b] * H + h) * S * D;
        int64_t n8 = (n + LANES - 1) / LANES * LANES;  /* scores padded to whole vectors, scoring -1e30 */
        float *s = (float *)aligned_alloc(64, sizeof(float) * G * n8);
        for (int64_t i = 0; i < G * n8; i++) s[i] = -1e30f;
        v8f *acc = (v8f *)aligned_alloc(64, sizeof(v8f) * G * W), *qv = (v8f *)aligned_alloc(64, sizeof(v8f) * G * W);
        for (int64_t i = 0; i < G * W; i++) { qv[i] = load8_f32(q + bh * G * D + i * LANES); acc[i] = (v8f){0}; }
        v8f kf[4][W];
        for (int64_t t0 = 0; t0 < n; t0 += 4) {
            int64_t m = n - t0 < 4 ? n - t0 : 4;
            for (int64_t i = 0; i < 4; i++)
                for (int64_t j = 0; j < W; j++) kf[i][j] = load8_{name_t}(K + (t0 + (i < m ? i : 0)) * D + j * LANES);
            for (int64_t g = 0; g < G; g++) {
                v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                for (int64_t j = 0; j < W; j++) {
                    v8f x = qv[g * W + j];
                    a0 += x * kf[0][j]; a1 += x * kf[1][j]; a2 += x * kf[2][j]; a3 += x * kf[3][j];
                }
                float r[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
                for (int64_t i = 0; i < m; i++) s[g * n8 + t0 + i] = r[i] * scale;
            }
        }
        for (int64_t g = 0; g < G; g++) {  /* softmax, 8 at a time over the padded row */
            v8f *sg = (v8f *)(s + g * n8), top = sg[0], total = {0};
            for (int64_t t = 1; t < n8 / LANES; t++) top = max8(top, sg[t]);
            float m = top[0];
            for (int64_t j = 1; j < LANES; j++) m = top[j] > m ? top[j] : m;
            for (int64_t t = 0; t < n8 / LANES; t++) { sg[t] = exp8(sg[t] - m); total += sg[t]; }
            v8f inv = (v8f){0} + 1.f / hsum8(total);
            for (int64_t t = 0; t < n8 / LANES; t++) sg[t] *= inv;
        }
        for (int64_t g = 0; g < G; g++) {  /* one query head at a time: its sums stay in registers */
            v8f a[W];
            for (int64_t j = 0; j < W; j++) a[j] = (v8f){0};
            const float *p = s + g * n8;
            for (int64_t t = 0; t < n; t++) {
                v8f w = (v8f){0} + p[t];
                for (int64_t j = 0; j < W; j++) a[j] += w * load8_{name_t}(V + t * D + j * LANES);
            }
            for (int64_t j = 0; j < W; j++) acc[g * W + j] = a[j];
        }
        {T} *o = out + bh * G * D;
        for (int64_t i = 0; i < G * W; i++)
            for (int64_t j = 0; j < LANES; j++) o[i * LANES + j] = {STORE}(acc[i][j]);
        free(s); free(acc); free(qv);
    }
}
"""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_load(uint16_t x) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)x << 16;
    return v.f;
}
static inline uint16_t bf16_store(float f) {  /* round to nearest even, as torch's cast */
    union { uint32_t u; float f; } v;
    v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}
static inline float same(float x) { return x; }
/* "v8f": a vector of LANES floats */
#define LANES 8  /* 16 (AVX-512) measured slower: the horizontal sums grow */
typedef float v8f __attribute__((vector_size(4 * LANES)));
typedef uint32_t v8u __attribute__((vector_size(4 * LANES)));
typedef uint16_t v8h __attribute__((vector_size(2 * LANES)));
static inline v8f load8_f32(const float *p) { v8f f; memcpy(&f, p, sizeof f); return f; }
static inline v8f load8_bf16(const uint16_t *p) {
    v8h x; memcpy(&x, p, sizeof x);
    v8u u = __builtin_convertvector(x, v8u) << 16;
    v8f f; memcpy(&f, &u, sizeof f); return f;
}
typedef int32_t v8i __attribute__((vector_size(4 * LANES)));
static inline v8f max8(v8f a, v8f b) { v8i m = a > b; v8i r = (m & (v8i)a) | (~m & (v8i)b); return (v8f)r; }
/* exp_approx on 8 lanes */
static inline v8f exp8(v8f x) {
    x = max8(x, (v8f){0} - 87.f);
    v8f y = x * 1.44269504089f;
    v8i k = __builtin_convertvector(y, v8i);   /* toward zero; one less where that rounded up */
    k += (v8i)(__builtin_convertvector(k, v8f) > y);
    v8f f = (y - __builtin_convertvector(k, v8f)) * 0.69314718056f;
    v8f p = 1.f + f * (1.f + f * (0.5f + f * (0.166666672f + f * (0.0416666418f + f * (0.00833336077f
            + f * 0.00138888889f)))));
    return p * (v8f)((k + 127) << 23);
}
static inline float hsum8(v8f v) { float t = 0.f; for (int i = 0; i < LANES; i++) t += v[i]; return t; }
/* exp(x) for x <= 0 (softmax after subtracting the max): 2^(x log2 e) by range reduction and a
   degree-6 polynomial, relative error ~1e-7, branch-free so that the loops vectorize */
static inline float exp_approx(float x) {
    x = x < -87.f ? -87.f : x;
    float y = x * 1.44269504089f;
    float k = __builtin_floorf(y);
    float f = (y - k) * 0.69314718056f;
    float p = 1.f + f * (1.f + f * (0.5f + f * (0.166666672f + f * (0.0416666418f + f * (0.00833336077f
              + f * 0.00138888889f)))));
    union { uint32_t u; float f; } e;
    e.u = (uint32_t)((int32_t)k + 127) << 23;
    return p * e.f;
}
"""
# a copy per cache dtype and head size: with the head size known the compiler unrolls the dot products
DTYPES = {"bf16": ("uint16_t", "bf16_load", "bf16_store"), "f32": ("float", "same", "same")}
HEAD_DIMS = ("64", "128", "any")
KERNELS = [f"attend_{dtype}_{d}" for dtype in DTYPES for d in HEAD_DIMS]
for _dtype, (_t, _load, _store) in DTYPES.items():
    for _d in HEAD_DIMS:
        SOURCE += ((_BODY if _d == "any" else _FAST).replace("{name}", f"{_dtype}_{_d}").replace("{name_t}", _dtype)
                   .replace("{T}", _t).replace("{LOAD}", _load).replace("{STORE}", _store).replace("{D}", _d))

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
        fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_void_p]
    return lib


def decode_attention(q, k_new, v_new, k_cache, v_cache, rows, pos, scale: float):
    """Write k_new/v_new [B, H, D] at (rows[b], :, pos[b]) of one layer's cache [slots, H, S, D],
    then attend: q [B, H * G, D] (query heads grouped by KV head) over each row's first pos[b] + 1
    positions. Returns [B, H * G * D] in the cache's dtype."""
    import torch

    lib = library()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == k_cache.shape):
        raise ValueError("decode_attention needs one layer's contiguous K and V caches of one shape")
    b, heads, d = k_new.shape
    fn = getattr(lib, f"attend_{'bf16' if k_cache.dtype == torch.bfloat16 else 'f32'}_{d if d in (64, 128) else 'any'}")
    q = q.float().contiguous()
    k_new, v_new = k_new.to(k_cache.dtype).contiguous(), v_new.to(k_cache.dtype).contiguous()
    rows, pos = rows.contiguous(), pos.contiguous()
    out = torch.empty(b, q.shape[1] * d, dtype=k_cache.dtype)
    fn(q.data_ptr(), k_new.data_ptr(), v_new.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), rows.data_ptr(),
       pos.data_ptr(), b, heads, q.shape[1] // heads, d, k_cache.shape[2], scale, out.data_ptr())
    return out


def supports(k_cache) -> bool:
    """The kernels apply to this cache: a contiguous bf16 or fp32 CPU tensor, and they built."""
    import torch

    return (k_cache.device.type == "cpu" and k_cache.dtype in (torch.bfloat16, torch.float32)
            and k_cache.is_contiguous() and library() is not None)
