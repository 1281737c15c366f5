#pragma once
/* bf16 matrix products on Intel AMX, for the decode step's few rows, where oneDNN's packed matmul
 * spends most of its time on per-call work (measured: docs/benchmarks.md, "AMX matrix products").
 * The weight is packed once (pack_amx) into groups of four 16-column blocks;
 * within a group, for each 32-wide slice of K, each block's 32 x 16 tile in the VNNI pair layout
 * AMX reads (1 KiB), so that a group streams from memory in order. Up to 16 rows: one A tile feeds
 * four products (64 columns); 32 rows and more: two A and two B tiles feed four (32 x 32).
 */
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
