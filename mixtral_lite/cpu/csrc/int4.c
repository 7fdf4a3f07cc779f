/* The int4 entries: few-row products with group-wise int4 weights (model/quant4.py's format; the
 * loops and the activations' preparation are in kernel.h, which the one-call layer shares), and the
 * chosen int4 experts of a few rows. */
#include "kernel.h"

static int bad4(long M, long I, long G) { return M < 1 || M > MAXM || G < 32 || G % 32 || I % G; }

/* Which loop the int4 products use: 2 AVX512-VNNI, 1 AVX2, 0 scalar. */
int few_rows_int4_path(void) {
#if defined(__AVX2__) && HAVE_VNNI4
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* y = x @ w.T for M (1..MAXM) rows, w int4 [O, I] (codes, float16 scale and offset [O, I / G]);
 * x and y bfloat16 (bf16 = 1) or float32. Returns 0, or -1 for bad arguments or a failed allocation
 * (nothing written). */
int few_rows_int4(const uint8_t *w, const uint16_t *s, const uint16_t *b, const void *x, void *y, long M, long O,
                  long I, long G, int bf16, int threads) {
    if (bad4(M, I, G)) return -1;
    Act a;
    if (act_init(&a, x, M, I, bf16, W_INT4, G) != 0) return -1;
    Out out = {y, NULL, O, bf16, NULL};
#pragma omp parallel num_threads(threads)
    {
        long o0, o1;
        share(O, &o0, &o1);
        product4(w, s, b, &a, out, M, I, o0, o1);
    }
    free(a.mem);
    return 0;
}

/* The mixture of M (1..MAXM) rows over their K chosen int4 experts: y[m] = sum_j rw[m, j] *
 * expert_{idx[m, j]}(x[m]), expert(x) = w2 @ (silu(w1 @ x) * (w3 @ x)), with stacked weights
 * (w1, w3: codes [E, I, D/2], scales and offsets [E, I, D/G]; w2: [E, D, I/2], [E, D, I/G]). Each
 * (row, choice) pair runs as three phases over the threads (w1 and w3, the gated product, w2), in
 * float32; each pair's output and the sum are rounded to the dtype as the plain per-expert code's.
 * idx int64 [M, K] in [0, E); rw float32 [M, K]. Returns 0, or -1 for bad arguments or a failed
 * allocation (nothing written). */
int few_rows_experts_int4(const uint8_t *w1, const uint16_t *s1, const uint16_t *b1, const uint8_t *w3,
                          const uint16_t *s3, const uint16_t *b3, const uint8_t *w2, const uint16_t *s2,
                          const uint16_t *b2, long E, const int64_t *idx, const float *rw, long K, const void *x,
                          void *y, long M, long D, long I, long G, int bf16, int threads) {
    if (bad4(M, D, G) || bad4(M, I, G) || K < 1 || E < 1) return -1;
    for (long j = 0; j < M * K; j++)
        if (idx[j] < 0 || idx[j] >= E) return -1;
    Act ax;
    if (act_init(&ax, x, M, D, bf16, W_INT4, G) != 0) return -1;
    float *ha = malloc(sizeof(float) * I), *hb = malloc(sizeof(float) * I), *yo = malloc(sizeof(float) * D);
    float *acc = calloc((size_t)M * D, sizeof(float));
    Act ah;
    memset(&ah, 0, sizeof ah);
    int failed = !ha || !hb || !yo || !acc;
    long ngd = D / G, ngi = I / G;
    for (long m = 0; !failed && m < M; m++)
        for (long j = 0; !failed && j < K; j++) {
            long e = idx[m * K + j];
            Act xm = ax; /* row m only */
            xm.f += m * D, xm.gs += m * ngd, xm.gsum += m * ngd;
            if (xm.q8) xm.q8 += m * q8_stride(D);
            Out oa = {ha, NULL, I, 0, NULL}, ob = {hb, NULL, I, 0, NULL}, oy = {yo, NULL, D, 0, NULL};
#pragma omp parallel num_threads(threads)
            {
                long i0, i1;
                share(I, &i0, &i1);
                product4(w1 + e * I * (D / 2), s1 + e * I * ngd, b1 + e * I * ngd, &xm, oa, 1, D, i0, i1);
                product4(w3 + e * I * (D / 2), s3 + e * I * ngd, b3 + e * I * ngd, &xm, ob, 1, D, i0, i1);
                for (long i = i0; i < i1; i++) ha[i] = silu(ha[i]) * hb[i];
#pragma omp barrier
#pragma omp single
                {
                    free(ah.mem);
                    failed = act_init(&ah, ha, 1, I, 0, W_INT4, G) != 0;
                }
                if (!failed) {
                    long d0, d1;
                    share(D, &d0, &d1);
                    product4(w2 + e * D * (I / 2), s2 + e * D * ngi, b2 + e * D * ngi, &ah, oy, 1, I, d0, d1);
                }
            }
            if (failed) break;
            float wj = rw[m * K + j];
            for (long d = 0; d < D; d++) {
                float v = yo[d];
                if (bf16) v = round_bf16(round_bf16(v) * wj);
                else v *= wj;
                float sum = j == 0 ? v : acc[m * D + d] + v;
                acc[m * D + d] = bf16 ? round_bf16(sum) : sum;
            }
        }
    if (!failed)
        for (long i = 0; i < M * D; i++) {
            if (bf16) ((uint16_t *)y)[i] = f32_to_bf16(acc[i]);
            else ((float *)y)[i] = acc[i];
        }
    free(ah.mem);
    free(ax.mem);
    free(ha);
    free(hb);
    free(yo);
    free(acc);
    return failed ? -1 : 0;
}
