/* Per cache dtype (KDTYPE, KT defined by decode.c); included once per dtype.
 *
 * Residual add and RMSNorm in one pass (Llama's: the sum of squares and the scaling in fp32, the
 * result rounded to the model's dtype, then times the weight), and SiLU(gate) * up, each rounded
 * where torch rounds, so the results match the modules they replace.
 */
void CAT(add_rmsnorm_, KDTYPE)(KT *x, const KT *delta, const KT *w, float eps, KT *out, int64_t B, int64_t N) {
    for (int64_t b = 0; b < B; b++) {
        KT *xb = x + b * N, *ob = out + b * N;
        v8f ss = {0};
        for (int64_t j = 0; j < N; j += LANES) {
            v8f v = CAT(load8_, KDTYPE)(xb + j);
            if (delta) { v = CAT(round8_, KDTYPE)(v + CAT(load8_, KDTYPE)(delta + b * N + j)); CAT(store8_, KDTYPE)(xb + j, v); }
            ss += v * v;
        }
        float r = 1.f / sqrtf(hsum8(ss) / (float)N + eps);
        for (int64_t j = 0; j < N; j += LANES)
            CAT(store8_, KDTYPE)(ob + j, CAT(round8_, KDTYPE)(CAT(load8_, KDTYPE)(xb + j) * r) * CAT(load8_, KDTYPE)(w + j));
    }
}

void CAT(silu_mul_, KDTYPE)(const KT *gate_up, int64_t stride, KT *out, int64_t B, int64_t I) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < I; j += LANES) {
            v8f g = CAT(load8_, KDTYPE)(gate_up + b * stride + j), up = CAT(load8_, KDTYPE)(gate_up + b * stride + I + j);
            v8i neg = g < 0;
            v8f e = exp8((v8f)((v8i)g | INT32_MIN));  /* exp(-|g|) */
            v8f one = (v8f){0} + 1.f, num = (v8f)((neg & (v8i)e) | (~neg & (v8i)one));
            CAT(store8_, KDTYPE)(out + b * I + j, CAT(round8_, KDTYPE)(g * num / (one + e)) * up);
        }
}
