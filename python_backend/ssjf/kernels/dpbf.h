#pragma once
/* The same products on AVX-512 BF16 without tiles (AMD Zen 4, Intel Cooper Lake): VDPBF16PS over
 * the very layout pack_amx makes, where each pair of K for a block's 16 columns is one 64-byte
 * vector. A group of up to four blocks is computed for up to six rows at a time (24 accumulators,
 * four weight vectors and a broadcast of each row's K pair: 29 of the 32 registers); the group's
 * weights stream from memory once and are re-read from L2 for the next six rows.
 */
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
