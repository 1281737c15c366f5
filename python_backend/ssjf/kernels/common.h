/* The decode kernels' shared prelude: headers, vector types, loads and stores per dtype, rotary. */
#pragma once
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
