/* Decode attention for one cache dtype and head size; decode.c includes it once per
 * variant with KNAME (the variant's name), KDTYPE (bf16 | f32), KT (the element type)
 * and KD (the head size: a literal, so the compiler unrolls the dot products, or
 * `head_dim`) defined. No include guard: it is meant to be included again.
 *
 * GCC vector types of LANES floats. A KV head's query heads go through in chunks of up to GMAX, each chunk's loops
 * specialized to its size (always_inline with a constant), so that every accumulator stays in a
 * register: scores take KEYS cached rows at a time for all of a chunk's heads (each K row loaded
 * once per chunk, the sums of a row folded by one transpose-add instead of a horizontal sum each),
 * and values take JC vectors of each V row at a time for all of a chunk's heads (each V row read
 * once per JC columns, not once per head). Rows a little ahead are prefetched: the cache is cold,
 * the weights having passed through since the last layer.
 */
static inline __attribute__((always_inline)) void CAT(scores_, KNAME)(const int64_t gc, const v8f *qv, const KT *K,
        const KT *V, int64_t n, int64_t n8, int64_t head_dim, float scale, float *s, const KT *nextK,
        const KT *nextV, int64_t next_n) {
    const int64_t D = KD, W = D / LANES, row = D * (int64_t)sizeof(KT);
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
        const KT *r0 = K + t0 * D, *r1 = K + (t0 + (m > 1)) * D, *r2 = K + (t0 + 2 * (m > 2)) * D,
                  *r3 = K + (t0 + 3 * (m > 3)) * D;
        v8f acc[GMAX][KEYS];
        for (int64_t g = 0; g < gc; g++)
            for (int64_t i = 0; i < KEYS; i++) acc[g][i] = (v8f){0};
        for (int64_t j = 0; j < W; j++) {
            v8f k0 = CAT(load8_, KDTYPE)(r0 + j * LANES), k1 = CAT(load8_, KDTYPE)(r1 + j * LANES),
                k2 = CAT(load8_, KDTYPE)(r2 + j * LANES), k3 = CAT(load8_, KDTYPE)(r3 + j * LANES);
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

static inline __attribute__((always_inline)) void CAT(values_, KNAME)(const int64_t gc, const int64_t cw, const float *p,
        const KT *V, int64_t n, int64_t n8, int64_t head_dim, int64_t j0, v8f *acc) {
    const int64_t D = KD, W = D / LANES;
    v8f a[GMAX][JC];
    for (int64_t g = 0; g < gc; g++)
        for (int64_t c = 0; c < cw; c++) a[g][c] = (v8f){0};
    for (int64_t t = 0; t < n; t++) {
        v8f vv[JC];
        for (int64_t c = 0; c < cw; c++) vv[c] = CAT(load8_, KDTYPE)(V + t * D + (j0 + c) * LANES);
        for (int64_t g = 0; g < gc; g++) {
            v8f w = (v8f){0} + p[g * n8 + t];
            for (int64_t c = 0; c < cw; c++) a[g][c] += w * vv[c];
        }
    }
    for (int64_t g = 0; g < gc; g++)
        for (int64_t c = 0; c < cw; c++) acc[g * W + j0 + c] = a[g][c];
}

static inline __attribute__((always_inline)) void CAT(chunk_, KNAME)(const int64_t gc, const v8f *qv, const KT *K,
        const KT *V, int64_t n, int64_t n8, int64_t head_dim, float scale, float *s, v8f *acc, const KT *nextK,
        const KT *nextV, int64_t next_n) {
    const int64_t D = KD, W = D / LANES;
    CAT(scores_, KNAME)(gc, qv, K, V, n, n8, head_dim, scale, s, nextK, nextV, next_n);
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
    for (; j0 + JC <= W; j0 += JC) CAT(values_, KNAME)(gc, JC, s, V, n, n8, head_dim, j0, acc);
    for (; j0 < W; j0++) CAT(values_, KNAME)(gc, 1, s, V, n, n8, head_dim, j0, acc);
}

void CAT(attend_, KNAME)(const KT *q, const KT *k, const KT *v, int64_t stride, const float *cos, const float *sin,
                   KT *k_cache, KT *v_cache, const int64_t *rows, const int64_t *pos, int64_t B, int64_t H,
                   int64_t G, int64_t head_dim, int64_t S, float scale, KT *out) {
    const int64_t D = KD, W = D / LANES;
    for (int64_t b = 0; b < B; b++)  /* the new K (rotated) and V into the cache */
        for (int64_t h = 0; h < H; h++) {
            int64_t dst = ((rows[b] * H + h) * S + pos[b]) * D;
            const KT *kb = k + b * stride + h * D;
            if (cos) {
                float x[D], y[D];
                for (int64_t d = 0; d < D; d++) x[d] = CAT(load_, KDTYPE)(kb[d]);
                rope(x, cos + pos[b] * D, sin + pos[b] * D, y, D);
                for (int64_t d = 0; d < D; d++) k_cache[dst + d] = CAT(store_, KDTYPE)(y[d]);
            } else {
                memcpy(k_cache + dst, kb, D * sizeof(KT));
            }
            memcpy(v_cache + dst, v + b * stride + h * D, D * sizeof(KT));
        }
    #pragma omp parallel for schedule(dynamic, 1)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H, n = pos[b] + 1;
        const KT *K = k_cache + (rows[b] * H + h) * S * D, *V = v_cache + (rows[b] * H + h) * S * D;
        int64_t n8 = (n + LANES - 1) / LANES * LANES;  /* scores padded to whole vectors, scoring -1e30 */
        float *s = (float *)aligned_alloc(64, sizeof(float) * GMAX * n8);
        v8f *qv = (v8f *)aligned_alloc(64, sizeof(v8f) * G * W), *acc = (v8f *)aligned_alloc(64, sizeof(v8f) * G * W);
        for (int64_t g = 0; g < G; g++) {  /* this group's queries, rotated, in fp32 */
            const KT *qg = q + b * stride + (h * G + g) * D;
            float x[D], y[D];
            for (int64_t d = 0; d < D; d++) x[d] = CAT(load_, KDTYPE)(qg[d]);
            if (cos) rope(x, cos + pos[b] * D, sin + pos[b] * D, y, D); else memcpy(y, x, sizeof y);
            for (int64_t j = 0; j < W; j++) qv[g * W + j] = load8_f32(y + j * LANES);
        }
        const KT *nK = NULL, *nV = NULL;
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
                case 1: CAT(chunk_, KNAME)(1, qc, K, V, n, n8, head_dim, scale, s, ac, nK, nV, nn); break;
                case 2: CAT(chunk_, KNAME)(2, qc, K, V, n, n8, head_dim, scale, s, ac, nK, nV, nn); break;
                case 3: CAT(chunk_, KNAME)(3, qc, K, V, n, n8, head_dim, scale, s, ac, nK, nV, nn); break;
                default: CAT(chunk_, KNAME)(4, qc, K, V, n, n8, head_dim, scale, s, ac, nK, nV, nn); break;
            }
        }
        KT *o = out + bh * G * D;
        for (int64_t g = 0; g < G; g++)
            for (int64_t j = 0; j < W; j++) CAT(store8_, KDTYPE)(o + (g * W + j) * LANES, acc[g * W + j]);
        free(s);
        free(qv);
        free(acc);
    }
}
