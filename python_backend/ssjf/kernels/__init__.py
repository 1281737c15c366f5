"""CPU kernels the torch runner's decode step uses where torch has none as fast.

`decode_attention`: one new token per sequence. It writes each sequence's new K and V into its
cache slot, then attends over that sequence's own live span only (its position + 1 tokens, not
the batch's longest), one pass over K and one over V, every query head of a KV group reading
each cached row once. torch's CPU flash attention, built for long queries, spent twice vLLM's
time here, and index_put's scatter of the new K/V cost as much again as the attention itself.

The source below is compiled once per machine (`-march=native`) with the system C compiler into
the cache directory and loaded with ctypes; it runs on torch's own OpenMP team (torch ships
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

from ..config import cache_dir

log = logging.getLogger(__name__)

# One copy per cache dtype and head size: {name}; {T} the element type and {D} the head size
# (a literal, so the compiler unrolls the dot products, or `head_dim`). GCC vector types of LANES
# floats. A KV head's query heads go through in chunks of up to GMAX, each chunk's loops
# specialized to its size (always_inline with a constant), so that every accumulator stays in a
# register: scores take KEYS cached rows at a time for all of a chunk's heads (each K row loaded
# once per chunk, the sums of a row folded by one transpose-add instead of a horizontal sum each),
# and values take JC vectors of each V row at a time for all of a chunk's heads (each V row read
# once per JC columns, not once per head). Rows a little ahead are prefetched: the cache is cold,
# the weights having passed through since the last layer.
_BODY = r"""
static inline __attribute__((always_inline)) void scores_{name}(const int64_t gc, const v8f *qv, const {T} *K,
        const {T} *V, int64_t n, int64_t n8, int64_t head_dim, float scale, float *s, const {T} *nextK,
        const {T} *nextV, int64_t next_n) {
    const int64_t D = {D}, W = D / LANES, row = D * (int64_t)sizeof({T});
    for (int64_t t0 = 0; t0 < n; t0 += KEYS) {
        int64_t m = n - t0 < KEYS ? n - t0 : KEYS;
        int64_t ahead = t0 + AHEAD < n ? t0 + AHEAD : n, ahead_end = t0 + AHEAD + KEYS < n ? t0 + AHEAD + KEYS : n;
        prefetch_rows(K, ahead, ahead_end, row, 0);
        prefetch_rows(V, ahead, ahead_end, row, 0);
        if (nextK) {  /* the next (sequence, head)'s rows into L2, a block at a time, the rest with the last block */
            int64_t to = t0 + KEYS >= n ? next_n : (t0 + KEYS < next_n ? t0 + KEYS : next_n);
            prefetch_rows(nextK, t0 < next_n ? t0 : next_n, to, row, 1);
            prefetch_rows(nextV, t0 < next_n ? t0 : next_n, to, row, 1);
        }
        const {T} *r0 = K + t0 * D, *r1 = K + (t0 + (m > 1)) * D, *r2 = K + (t0 + 2 * (m > 2)) * D,
                  *r3 = K + (t0 + 3 * (m > 3)) * D;
        v8f acc[GMAX][KEYS];
        for (int64_t g = 0; g < gc; g++)
            for (int64_t i = 0; i < KEYS; i++) acc[g][i] = (v8f){0};
        for (int64_t j = 0; j < W; j++) {
            v8f k0 = load8_{dtype}(r0 + j * LANES), k1 = load8_{dtype}(r1 + j * LANES),
                k2 = load8_{dtype}(r2 + j * LANES), k3 = load8_{dtype}(r3 + j * LANES);
            for (int64_t g = 0; g < gc; g++) {
                v8f x = qv[g * W + j];
                acc[g][0] += x * k0; acc[g][1] += x * k1; acc[g][2] += x * k2; acc[g][3] += x * k3;
            }
        }
        for (int64_t g = 0; g < gc; g++) {
            float r[KEYS];
            reduce4(acc[g][0], acc[g][1], acc[g][2], acc[g][3], r);
            for (int64_t i = 0; i < m; i++) s[g * n8 + t0 + i] = r[i] * scale;
        }
    }
}

static inline __attribute__((always_inline)) void values_{name}(const int64_t gc, const int64_t cw, const float *p,
        const {T} *V, int64_t n, int64_t n8, int64_t head_dim, int64_t j0, v8f *acc) {
    const int64_t D = {D}, W = D / LANES;
    v8f a[GMAX][JC];
    for (int64_t g = 0; g < gc; g++)
        for (int64_t c = 0; c < cw; c++) a[g][c] = (v8f){0};
    for (int64_t t = 0; t < n; t++) {
        v8f vv[JC];
        for (int64_t c = 0; c < cw; c++) vv[c] = load8_{dtype}(V + t * D + (j0 + c) * LANES);
        for (int64_t g = 0; g < gc; g++) {
            v8f w = (v8f){0} + p[g * n8 + t];
            for (int64_t c = 0; c < cw; c++) a[g][c] += w * vv[c];
        }
    }
    for (int64_t g = 0; g < gc; g++)
        for (int64_t c = 0; c < cw; c++) acc[g * W + j0 + c] = a[g][c];
}

static inline __attribute__((always_inline)) void chunk_{name}(const int64_t gc, const v8f *qv, const {T} *K,
        const {T} *V, int64_t n, int64_t n8, int64_t head_dim, float scale, float *s, v8f *acc, const {T} *nextK,
        const {T} *nextV, int64_t next_n) {
    const int64_t D = {D}, W = D / LANES;
    scores_{name}(gc, qv, K, V, n, n8, head_dim, scale, s, nextK, nextV, next_n);
    for (int64_t g = 0; g < gc; g++) {  /* softmax, a vector at a time over the padded row */
        v8f *sg = (v8f *)(s + g * n8), top = sg[0], total = {0};
        for (int64_t t = 1; t < n8 / LANES; t++) top = max8(top, sg[t]);
        float mx = top[0];
        for (int64_t j = 1; j < LANES; j++) mx = top[j] > mx ? top[j] : mx;
        for (int64_t t = 0; t < n8 / LANES; t++) { sg[t] = exp8(sg[t] - mx); total += sg[t]; }
        v8f inv = (v8f){0} + 1.f / hsum8(total);
        for (int64_t t = 0; t < n8 / LANES; t++) sg[t] *= inv;
    }
    int64_t j0 = 0;
    for (; j0 + JC <= W; j0 += JC) values_{name}(gc, JC, s, V, n, n8, head_dim, j0, acc);
    for (; j0 < W; j0++) values_{name}(gc, 1, s, V, n, n8, head_dim, j0, acc);
}

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
        float *s = (float *)aligned_alloc(64, sizeof(float) * GMAX * n8);
        v8f *qv = (v8f *)aligned_alloc(64, sizeof(v8f) * G * W), *acc = (v8f *)aligned_alloc(64, sizeof(v8f) * G * W);
        for (int64_t g = 0; g < G; g++) {  /* this group's queries, rotated, in fp32 */
            const {T} *qg = q + b * stride + (h * G + g) * D;
            float x[D], y[D];
            for (int64_t d = 0; d < D; d++) x[d] = load_{dtype}(qg[d]);
            if (cos) rope(x, cos + pos[b] * D, sin + pos[b] * D, y, D); else memcpy(y, x, sizeof y);
            for (int64_t j = 0; j < W; j++) qv[g * W + j] = load8_f32(y + j * LANES);
        }
        const {T} *nK = NULL, *nV = NULL;
        int64_t nn = 0;
        if (bh + 1 < B * H) {
            int64_t b1 = (bh + 1) / H, h1 = (bh + 1) % H;
            nK = k_cache + (rows[b1] * H + h1) * S * D; nV = v_cache + (rows[b1] * H + h1) * S * D; nn = pos[b1] + 1;
        }
        for (int64_t g0 = 0; g0 < G; g0 += GMAX) {
            for (int64_t i = 0; i < GMAX * n8; i++) s[i] = -1e30f;
            const v8f *qc = qv + g0 * W;
            v8f *ac = acc + g0 * W;
            switch (G - g0 < GMAX ? G - g0 : GMAX) {
                case 1: chunk_{name}(1, qc, K, V, n, n8, head_dim, scale, s, ac, nK, nV, nn); break;
                case 2: chunk_{name}(2, qc, K, V, n, n8, head_dim, scale, s, ac, nK, nV, nn); break;
                case 3: chunk_{name}(3, qc, K, V, n, n8, head_dim, scale, s, ac, nK, nV, nn); break;
                default: chunk_{name}(4, qc, K, V, n, n8, head_dim, scale, s, ac, nK, nV, nn); break;
            }
        }
        {T} *o = out + bh * G * D;
        for (int64_t g = 0; g < G; g++)
            for (int64_t j = 0; j < W; j++) store8_{dtype}(o + (g * W + j) * LANES, acc[g * W + j]);
        free(s);
        free(qv);
        free(acc);
    }
}
"""

# Residual add and RMSNorm in one pass (Llama's: the sum of squares and the scaling in fp32, the
# result rounded to the model's dtype, then times the weight), and SiLU(gate) * up, each rounded
# where torch rounds, so the results match the modules they replace.
_POINTWISE = r"""
void add_rmsnorm_{dtype}({T} *x, const {T} *delta, const {T} *w, float eps, {T} *out, int64_t B, int64_t N) {
    for (int64_t b = 0; b < B; b++) {
        {T} *xb = x + b * N, *ob = out + b * N;
        v8f ss = {0};
        for (int64_t j = 0; j < N; j += LANES) {
            v8f v = load8_{dtype}(xb + j);
            if (delta) { v = round8_{dtype}(v + load8_{dtype}(delta + b * N + j)); store8_{dtype}(xb + j, v); }
            ss += v * v;
        }
        float r = 1.f / sqrtf(hsum8(ss) / (float)N + eps);
        for (int64_t j = 0; j < N; j += LANES)
            store8_{dtype}(ob + j, round8_{dtype}(load8_{dtype}(xb + j) * r) * load8_{dtype}(w + j));
    }
}

void silu_mul_{dtype}(const {T} *gate_up, int64_t stride, {T} *out, int64_t B, int64_t I) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < I; j += LANES) {
            v8f g = load8_{dtype}(gate_up + b * stride + j), up = load8_{dtype}(gate_up + b * stride + I + j);
            v8i neg = g < 0;
            v8f e = exp8((v8f)((v8i)g | INT32_MIN));  /* exp(-|g|) */
            v8f one = (v8f){0} + 1.f, num = (v8f)((neg & (v8i)e) | (~neg & (v8i)one));
            store8_{dtype}(out + b * I + j, round8_{dtype}(g * num / (one + e)) * up);
        }
}
"""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define LANES 8  /* 16 (AVX-512) measured slower: the horizontal sums grow */
#define KEYS 4    /* cached rows scored at a time */
#define GMAX 4    /* query heads of a KV head taken together */
#define JC 4      /* value columns (vectors) taken together */
#define AHEAD 16  /* rows prefetched ahead */
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
#ifdef __AVX2__  /* one widening move (the generic form takes two and an insert) */
    __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
    return (v8f)_mm256_castsi256_ps(u);
#else
    v8h x; memcpy(&x, p, sizeof x);
    v8u u = __builtin_convertvector(x, v8u) << 16;
    v8f f; memcpy(&f, &u, sizeof f); return f;
#endif
}
static inline void store8_f32(float *p, v8f x) { memcpy(p, &x, sizeof x); }
static inline v8f round8_f32(v8f x) { return x; }
static inline v8u bf16_bits8(v8f f) {  /* round to nearest even, NaN kept, in the top half */
    v8u u; memcpy(&u, &f, sizeof u);
    v8u nan = (v8u)((u & 0x7fffffffu) > 0x7f800000u);
    v8u r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    return (nan & ((u & 0xffff0000u) | 0x00400000u)) | (~nan & r);
}
#if defined(__AVX512BF16__) && defined(__AVX512VL__)  /* the CPU's own rounding (to nearest even) */
static inline void store8_bf16(uint16_t *p, v8f x) { __m128bh h = _mm256_cvtneps_pbh((__m256)x); memcpy(p, &h, sizeof h); }
static inline v8f round8_bf16(v8f x) { uint16_t h[8]; store8_bf16(h, x); return load8_bf16(h); }
#else
static inline v8f round8_bf16(v8f x) { v8u u = bf16_bits8(x); v8f f; memcpy(&f, &u, sizeof f); return f; }
static inline void store8_bf16(uint16_t *p, v8f x) {
    v8h h = __builtin_convertvector(bf16_bits8(x) >> 16, v8h); memcpy(p, &h, sizeof h);
}
#endif
static inline v8f max8(v8f a, v8f b) { v8i m = a > b; return (v8f)((m & (v8i)a) | (~m & (v8i)b)); }
#if defined(__clang__) || __GNUC__ >= 12
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif
/* the four sums of a0..a3's lanes: pairs, then halves, then the two halves of each */
static inline void reduce4(v8f a0, v8f a1, v8f a2, v8f a3, float *r) {
    v8f x = SHUF(a0, a1, 0, 8, 2, 10, 4, 12, 6, 14) + SHUF(a0, a1, 1, 9, 3, 11, 5, 13, 7, 15);
    v8f y = SHUF(a2, a3, 0, 8, 2, 10, 4, 12, 6, 14) + SHUF(a2, a3, 1, 9, 3, 11, 5, 13, 7, 15);
    v8f p = SHUF(x, y, 0, 1, 8, 9, 4, 5, 12, 13) + SHUF(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
    for (int i = 0; i < 4; i++) r[i] = p[i] + p[i + 4];
}
/* rows [from, to) of a span, into L1 or (l2) L2 */
static inline void prefetch_rows(const void *base, int64_t from, int64_t to, int64_t row_bytes, int l2) {
    const char *p = (const char *)base;
    for (int64_t l = from * row_bytes; l < to * row_bytes; l += 64) {
        if (l2) __builtin_prefetch(p + l, 0, 2); else __builtin_prefetch(p + l, 0, 3);
    }
}

static inline float hsum8(v8f v) { float t = 0.f; for (int i = 0; i < LANES; i++) t += v[i]; return t; }
/* exp(x) for x <= 0 (softmax after subtracting the max): 2^(x log2 e) by range reduction and a
   degree-6 polynomial, relative error ~1e-7, branch-free so that it vectorizes; 0 below -87 */
static inline v8f exp8(v8f x) {
    v8i under = x < -87.f;  /* below fp32's normal range: 0, as expf gives (to a denormal) */
    x = max8(x, (v8f){0} - 87.f);
    v8f y = x * 1.44269504089f;
    v8i k = __builtin_convertvector(y, v8i);  /* toward zero; one less where that rounded up */
    k += (v8i)(__builtin_convertvector(k, v8f) > y);
    v8f f = (y - __builtin_convertvector(k, v8f)) * 0.69314718056f;
    v8f p = 1.f + f * (1.f + f * (0.5f + f * (0.166666672f + f * (0.0416666418f + f * (0.00833336077f
            + f * 0.00138888889f)))));
    return (v8f)(~under & (v8i)(p * (v8f)((k + 127) << 23)));
}
/* rotary embedding, Llama's "rotate half" form: y = x cos + (-x2, x1) sin */
static inline void rope(const float *x, const float *cos, const float *sin, float *y, int64_t D) {
    int64_t half = D / 2;
    for (int64_t d = 0; d < half; d++) y[d] = x[d] * cos[d] - x[d + half] * sin[d];
    for (int64_t d = half; d < D; d++) y[d] = x[d] * cos[d] + x[d - half] * sin[d];
}
"""
# bf16 matrix products on Intel AMX, for the decode step's few rows. oneDNN's packed matmul spent
# 22 us on a 16 x 576 x 576 product that takes 11 here, the rest being per-call work; the step
# makes 121 of them. The weight is packed once (pack_amx) into groups of four 16-column blocks;
# within a group, for each 32-wide slice of K, each block's 32 x 16 tile in the VNNI pair layout
# AMX reads (1 KiB), so that a group streams from memory in order. Up to 16 rows: one A tile feeds
# four products (64 columns); 32 rows and more: two A and two B tiles feed four (32 x 32).
_AMX = r"""
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512VL__)
#include <sys/syscall.h>
#include <unistd.h>
typedef struct { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } tile_config;

int amx_ready(void) {  /* Linux hands out the tile registers on request (once per process) */
    static int ready = -1;
    if (ready < 0) ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return ready;
}
static inline void amx_tiles(int64_t rows) {  /* every tile rows x 64 bytes; B tiles 16 rows */
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) { c.rows[t] = (uint8_t)(t < 5 ? rows : 16); c.colsb[t] = 64; }
    _tile_loadconfig(&c);
}
static inline void amx_out(const float *acc, const float *bias, uint16_t *y, int64_t cols) {
    for (int64_t c = 0; c < cols; c += LANES) {
        v8f v = load8_f32(acc + c);
        if (bias) v += load8_f32(bias + c);
        store8_bf16(y + c, v);
    }
}
/* y[m, N] = x[m, K] @ W.T (+ bias, fp32), W packed by pack_amx; K % 32 == 0, N % 16 == 0 */
void amx_linear(const uint16_t *x, int64_t ldx, int64_t m, int64_t K, const uint16_t *w, int64_t N,
                const float *bias, uint16_t *y, int64_t ldy) {
    if (m <= 0) return;
    const int64_t KB = K / 32, groups = (N + 63) / 64, rows = m < 16 ? m : 16, sx = ldx * 2;
    #pragma omp parallel
    {
        amx_tiles(rows);
        float acc[32 * 64] __attribute__((aligned(64)));
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            const int64_t cnt = N - g * 64 >= 64 ? 4 : (N - g * 64) / 16;
            const uint16_t *wg = w + g * 64 * K;
            const float *bg = bias ? bias + g * 64 : 0;
            if (m >= 32) {
                for (int64_t h = 0; h < cnt; h += 2) {
                    const int two = h + 1 < cnt;
                    for (int64_t rp = 0; rp < m; rp += 32) {
                        const int64_t r0 = rp + 32 > m ? m - 32 : rp;  /* the last pair overlaps: same values */
                        const uint16_t *x0 = x + r0 * ldx, *x1 = x0 + 16 * ldx;
                        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                        for (int64_t kb = 0; kb < KB; kb++) {
                            const uint16_t *t = wg + (kb * cnt + h) * 512;
                            _tile_loadd(4, x0 + kb * 32, sx);
                            _tile_loadd(6, t, 64);
                            _tile_loadd(5, x1 + kb * 32, sx);
                            _tile_dpbf16ps(0, 4, 6);
                            _tile_dpbf16ps(2, 5, 6);
                            if (two) {
                                _tile_loadd(7, t + 512, 64);
                                _tile_dpbf16ps(1, 4, 7);
                                _tile_dpbf16ps(3, 5, 7);
                            }
                        }
                        _tile_stored(0, acc, 128); _tile_stored(1, acc + 16, 128);
                        _tile_stored(2, acc + 512, 128); _tile_stored(3, acc + 528, 128);
                        for (int64_t r = 0; r < 32; r++)
                            amx_out(acc + r * 32, bg ? bg + h * 16 : 0, y + (r0 + r) * ldy + g * 64 + h * 16,
                                    (1 + two) * 16);
                    }
                }
                continue;
            }
            for (int64_t r0 = 0; r0 < m; r0 += 16) {
                const int64_t at = r0 + rows > m ? m - rows : r0;
                const uint16_t *xr = x + at * ldx;
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                if (cnt == 4) {
                    for (int64_t kb = 0; kb < KB; kb++) {
                        const uint16_t *t = wg + kb * 4 * 512;
                        _mm_prefetch((const char *)(t + 8 * 512), _MM_HINT_T0);  /* two slices ahead */
                        _mm_prefetch((const char *)(t + 8 * 512 + 32), _MM_HINT_T0);
                        _tile_loadd(4, xr + kb * 32, sx);
                        _tile_loadd(5, t, 64);
                        _tile_dpbf16ps(0, 4, 5);
                        _tile_loadd(6, t + 512, 64);
                        _tile_dpbf16ps(1, 4, 6);
                        _tile_loadd(7, t + 1024, 64);
                        _tile_dpbf16ps(2, 4, 7);
                        _tile_loadd(5, t + 1536, 64);
                        _tile_dpbf16ps(3, 4, 5);
                    }
                } else {
                    for (int64_t kb = 0; kb < KB; kb++) {
                        const uint16_t *t = wg + kb * cnt * 512;
                        _tile_loadd(4, xr + kb * 32, sx);
                        _tile_loadd(5, t, 64);
                        _tile_dpbf16ps(0, 4, 5);
                        if (cnt > 1) { _tile_loadd(6, t + 512, 64); _tile_dpbf16ps(1, 4, 6); }
                        if (cnt > 2) { _tile_loadd(7, t + 1024, 64); _tile_dpbf16ps(2, 4, 7); }
                    }
                }
                _tile_stored(0, acc, 256); _tile_stored(1, acc + 16, 256);
                _tile_stored(2, acc + 32, 256); _tile_stored(3, acc + 48, 256);
                for (int64_t r = 0; r < rows; r++) amx_out(acc + r * 64, bg, y + (at + r) * ldy + g * 64, cnt * 16);
            }
        }
        _tile_release();
    }
}
#else
int amx_ready(void) { return 0; }
void amx_linear(const uint16_t *x, int64_t ldx, int64_t m, int64_t K, const uint16_t *w, int64_t N,
                const float *bias, uint16_t *y, int64_t ldy) { abort(); }
#endif
"""
# The same products on AVX-512 BF16 without tiles (AMD Zen 4, Intel Cooper Lake): VDPBF16PS over
# the very layout pack_amx makes, where each pair of K for a block's 16 columns is one 64-byte
# vector. A group of up to four blocks is computed for up to six rows at a time (24 accumulators,
# four weight vectors and a broadcast of each row's K pair: 29 of the 32 registers); the group's
# weights stream from memory once and are re-read from L2 for the next six rows.
_DPBF = r"""
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#ifndef DPBF_AHEAD
#define DPBF_AHEAD 128  /* pairs: 8 KiB ahead in a group of four blocks */
#endif
int dpbf_ready(void) { return 1; }
static inline __attribute__((always_inline)) void dpbf_block(const uint16_t *x, int64_t ldx, int64_t K,
        const uint16_t *wg, const int C, const int R, const float *bias, uint16_t *y, int64_t ldy) {
    __m512 acc[6][4];
    for (int r = 0; r < R; r++) for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    #pragma GCC unroll 4
    for (int64_t q = 0; q < K / 2; q++) {  /* the group's vectors for pair q lie side by side */
        const uint16_t *t = wg + q * C * 32;
        __m512bh w[4];
        for (int c = 0; c < C; c++) {
            _mm_prefetch((const char *)(t + DPBF_AHEAD * C * 32 + c * 32), _MM_HINT_T0);
            w[c] = (__m512bh)_mm512_loadu_si512((const void *)(t + c * 32));
        }
        for (int r = 0; r < R; r++) {
            int32_t pair;
            memcpy(&pair, x + r * ldx + 2 * q, 4);
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xb, w[c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            __m512 v = acc[r][c];
            if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + c * 16));
            const __m256bh h = _mm512_cvtneps_pbh(v);
            memcpy(y + r * ldy + c * 16, &h, sizeof h);
        }
}
/* y[m, N] = x[m, K] @ W.T (+ bias, fp32), W packed by pack_dpbf; K % 2 == 0, N % 16 == 0 */
void dpbf_linear(const uint16_t *x, int64_t ldx, int64_t m, int64_t K, const uint16_t *w, int64_t N,
                 const float *bias, uint16_t *y, int64_t ldy) {
    const int64_t groups = (N + 63) / 64;
    #pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const int C = N - g * 64 >= 64 ? 4 : (int)((N - g * 64) / 16);
        const uint16_t *wg = w + g * 64 * K;
        const float *bg = bias ? bias + g * 64 : 0;
        for (int64_t r0 = 0; r0 < m; r0 += 6) {
            const int R = m - r0 < 6 ? (int)(m - r0) : 6;
            const uint16_t *xr = x + r0 * ldx;
            uint16_t *yr = y + r0 * ldy + g * 64;
            switch (C * 8 + R) {
#define DPBF_CASE(c, r) case c * 8 + r: dpbf_block(xr, ldx, K, wg, c, r, bg, yr, ldy); break;
#define DPBF_ROWS(c) DPBF_CASE(c, 1) DPBF_CASE(c, 2) DPBF_CASE(c, 3) DPBF_CASE(c, 4) DPBF_CASE(c, 5) DPBF_CASE(c, 6)
                DPBF_ROWS(1) DPBF_ROWS(2) DPBF_ROWS(3) DPBF_ROWS(4)
            }
        }
    }
}
#else
int dpbf_ready(void) { return 0; }
void dpbf_linear(const uint16_t *x, int64_t ldx, int64_t m, int64_t K, const uint16_t *w, int64_t N,
                 const float *bias, uint16_t *y, int64_t ldy) { abort(); }
#endif
"""
DTYPES = {"bf16": "uint16_t", "f32": "float"}
HEAD_DIMS = ("64", "128", "any")  # "any": a multiple of LANES, known at run time
KERNELS = [f"attend_{dtype}_{d}" for dtype in DTYPES for d in HEAD_DIMS]
for _dtype, _t in DTYPES.items():
    SOURCE += _POINTWISE.replace("{dtype}", _dtype).replace("{T}", _t)
    for _d in HEAD_DIMS:
        SOURCE += (_BODY.replace("{name}", f"{_dtype}_{_d}").replace("{dtype}", _dtype).replace("{T}", _t)
                   .replace("{D}", "head_dim" if _d == "any" else _d))
SOURCE += _AMX + _DPBF
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
