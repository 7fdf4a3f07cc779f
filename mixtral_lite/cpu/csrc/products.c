/* Few-row matrix products on the CPU: y[m, o] = sum_k x[m, k] * w[o, k] for 1-8 rows of x.
 *
 * Decoding multiplies one row (or a few) of activations by every weight matrix, so it runs at the
 * speed the weights stream from memory. These loops read each weight once for all rows, convert
 * it to float32 in registers (bfloat16: a 16-bit shift; int8: a sign extension) and accumulate in
 * float32: the same sums as F.linear up to the order of the additions, rounded once at the end.
 * Built by native.py with -O3 -march=native, so the compiler vectorises the loops for the CPU at
 * hand (AVX-512, AVX2, NEON); OpenMP spreads the outputs over the threads PyTorch uses, and each
 * thread writes its own outputs in the caller's dtype.
 *
 * Weights: bfloat16 (uint16_t bit patterns), float32 or int8 with one scale per output, [O, I],
 * row-major (w[o, k] at o * I + k); the experts also int4 (kernel.h: codes, group scales, offsets). x [M, I] and y [M, O] are row-major, both bfloat16 or both
 * float32 (the scale too).
 *
 * Entries here: few_rows (one product), few_rows_swiglu (one expert), few_rows_experts (the chosen
 * experts of every row, weighted and summed). The loops are in kernel.h; decode.c has the entries
 * for attention, the rotary embedding and norms, layer.c the router and the whole layer,
 * attention.c the attention of many query rows (prefill).
 */
#include "kernel.h"

/* Whether int8 products use vpdpwssd on int16 activations (1) or the float32 loop (0). */
int few_rows_vnni(void) { return HAVE_VNNI; }

/* Whether bfloat16 products use vdpbf16ps (1) or the float32 loop (0). */
int few_rows_dpbf16(void) { return HAVE_DPBF16; }

/* y = (x @ w.T) [* scale] for M (1..LAYER_MAXM) rows. wtype: W_F32, W_BF16 or W_INT8 (scale required);
 * bf16: x, y and scale are bfloat16 (1) or float32 (0). Returns 0, or -1 for bad arguments or a
 * failed allocation (nothing written). */
int few_rows(const void *w, int wtype, const void *scale, const void *x, void *y, long M, long O, long I, int bf16,
             int threads) {
    if (M < 1 || M > LAYER_MAXM || bad_types(wtype, scale, bf16) || wtype == W_INT4) return -1; /* int4: int4.c */
    Act a;
    if (act_init(&a, x, M, I, bf16, wtype, 0) != 0) return -1;
    Out out = {y, scale, O, bf16, NULL};
    if ((O + V - 1) / V < 2 || threads < 2) { /* one block of outputs (a router): no parallel region */
        product(w, wtype, &a, out, M, I, 0, O);
    } else {
#pragma omp parallel num_threads(threads)
        {
            long o0, o1;
            share(O, &o0, &o1);
            product(w, wtype, &a, out, M, I, o0, o1);
        }
    }
    free(a.mem);
    return 0;
}

/* One SwiGLU expert's weights: w1, w3 [I, D] and w2 [D, I] of type wtype (int8: with scales s1, s3
 * [I] and s2 [D]; int4: float16 scales and offsets b1, b3 [I, D / G], s2, b2 [D, I / G]; else NULL). */
typedef struct {
    const void *w1, *w3, *w2, *s1, *s3, *s2, *b1, *b3, *b2;
    int wtype;
    long G;
} Expert;

/* Scratch and shared state of a SwiGLU run by a team of threads. */
typedef struct {
    void *a, *b; /* [M, I] each, in the activations' dtype */
    Act h;       /* the gated product, prepared for the w2 product */
    int failed;
} Team;

/* Run by every thread of a parallel region: y = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T for the M rows
 * of x (prepared as ax). The threads split the I hidden units, then, after a barrier, the D outputs.
 * Each intermediate is rounded to bfloat16 where PyTorch's bfloat16 ops would round it (both
 * products, silu, the gated product), so the result is the plain three-product code's, up to the
 * order of the float32 additions. On return all threads have finished (t->failed: an allocation
 * failed, y not written). */
static void swiglu_team(Expert ex, const Act *ax, Team *t, void *y, long M, long D, long I, int bf16) {
    Out oa = {t->a, ex.s1, I, bf16, NULL, ex.b1}, ob = {t->b, ex.s3, I, bf16, NULL, ex.b3};
    Out oy = {y, ex.s2, D, bf16, NULL, ex.b2};
    long i0, i1;
    share(I, &i0, &i1);
    product(ex.w1, ex.wtype, ax, oa, M, D, i0, i1);
    product(ex.w3, ex.wtype, ax, ob, M, D, i0, i1);
    for (long m = 0; m < M; m++)
        for (long i = i0; i < i1; i++) {
            long j = m * I + i;
            if (bf16) {
                uint16_t *ha = (uint16_t *)t->a;
                float g = round_bf16(silu(bf16_to_f32(ha[j])));
                ha[j] = f32_to_bf16(g * bf16_to_f32(((const uint16_t *)t->b)[j]));
            } else {
                float *fa = (float *)t->a;
                fa[j] = silu(fa[j]) * ((const float *)t->b)[j];
            }
        }
#pragma omp barrier
#pragma omp single
    {
        free(t->h.mem);
        t->failed = act_init(&t->h, t->a, M, I, bf16, ex.wtype, ex.G) != 0;
    }
    if (!t->failed) {
        long d0, d1;
        share(D, &d0, &d1);
        product(ex.w2, ex.wtype, &t->h, oy, M, I, d0, d1);
    }
#pragma omp barrier
}

static int team_init(Team *t, long M, long I, int bf16) {
    size_t el = bf16 ? 2 : 4;
    memset(t, 0, sizeof *t);
    t->a = malloc(el * M * I);
    t->b = malloc(el * M * I);
    return t->a && t->b ? 0 : -1;
}

static void team_free(Team *t) {
    free(t->a);
    free(t->b);
    free(t->h.mem);
}

static int bad_expert(Expert ex, long D, long I, int bf16) {
    return bad_types(ex.wtype, ex.s1, bf16) || (ex.s1 == NULL) != (ex.s3 == NULL) || (ex.s1 == NULL) != (ex.s2 == NULL) ||
           bad_groups(ex.wtype, ex.b1, ex.G, D) || bad_groups(ex.wtype, ex.b3, ex.G, D) || bad_groups(ex.wtype, ex.b2, ex.G, I);
}

/* One SwiGLU expert on M (1..MAXM) rows: y = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T (see Expert and
 * swiglu_team), x and y bfloat16 (bf16 = 1) or float32. Returns 0, or -1 for bad arguments or a
 * failed allocation (nothing written). */
int few_rows_swiglu(const void *w1, const void *w3, const void *w2, const void *s1, const void *s3, const void *s2,
                    int wtype, const void *x, void *y, long M, long D, long I, int bf16, int threads) {
    Expert ex = {w1, w3, w2, s1, s3, s2, NULL, NULL, NULL, wtype, 0};
    if (M < 1 || M > MAXM || bad_expert(ex, D, I, bf16) || wtype == W_INT4) return -1; /* int4: int4.c */
    Team t;
    Act ax;
    if (team_init(&t, M, I, bf16) != 0 || act_init(&ax, x, M, D, bf16, wtype, 0) != 0) {
        team_free(&t);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    swiglu_team(ex, &ax, &t, y, M, D, I, bf16);
    int failed = t.failed;
    free(ax.mem);
    team_free(&t);
    return failed ? -1 : 0;
}

/* The expert e's slice of the stacked weights (int4: half a byte per weight, float16 scales and
 * offsets per group). */
static Expert expert_at(Expert base, long e, long D, long I, int bf16) {
    size_t el = bf16 ? 2 : 4;
    Expert ex = base;
    if (base.wtype == W_INT4) {
        long n = e * I * D, ng = n / base.G;
        ex.w1 = (const uint8_t *)base.w1 + n / 2, ex.w3 = (const uint8_t *)base.w3 + n / 2;
        ex.w2 = (const uint8_t *)base.w2 + n / 2;
        ex.s1 = (const uint16_t *)base.s1 + ng, ex.s3 = (const uint16_t *)base.s3 + ng;
        ex.s2 = (const uint16_t *)base.s2 + ng;
        ex.b1 = (const uint16_t *)base.b1 + ng, ex.b3 = (const uint16_t *)base.b3 + ng;
        ex.b2 = (const uint16_t *)base.b2 + ng;
        return ex;
    }
    size_t wel = base.wtype == W_INT8 ? 1 : el;
    ex.w1 = (const char *)base.w1 + wel * e * I * D;
    ex.w3 = (const char *)base.w3 + wel * e * I * D;
    ex.w2 = (const char *)base.w2 + wel * e * I * D;
    if (base.s1) {
        ex.s1 = (const char *)base.s1 + el * e * I;
        ex.s3 = (const char *)base.s3 + el * e * I;
        ex.s2 = (const char *)base.s2 + el * e * D;
    }
    return ex;
}

/* Rows [r0, r0 + n) of a prepared activation block. */
static Act act_rows(Act a, long r0, long D) {
    if (a.bf) a.bf += r0 * D;
    if (a.q) a.q += r0 * D, a.qs += r0;
    if (a.f) a.f += r0 * D;
    if (a.gs) a.gs += r0 * (D / a.G), a.gsum += r0 * (D / a.G);
    if (a.q8) a.q8 += r0 * q8_stride(D);
    return a;
}

/* The mixture of M (1..LAYER_MAXM) rows: y[m] = sum_j rw[m, j] * expert_{idx[m, j]}(x[m]) over the K chosen
 * experts of each row, from stacked weights (expert e at e * I * D elements of w1, w3 and w2; scales
 * at e * I and e * D). Rows that chose the same expert run through it together, so each chosen
 * expert's weights are read once. Two phases over all chosen experts at once, one barrier between
 * them (two where the gated products must be converted for w2): w1, w3 and the gating of the same
 * hidden units, then w2; in each, every thread streams one contiguous share. Rounding as the plain
 * code's: each expert output rounded to the dtype, times its float32 weight rounded, added in the
 * order of j, each sum rounded. idx: int64 [M, K] in [0, E); rw: float32 [M, K]; res: a residual
 * [M, D] added last (as PyTorch's add), or NULL. int4 weights (wtype W_INT4): s1, s3, s2 their
 * float16 scales, b1, b3, b2 their offsets, G inputs per group (else NULL and ignored). Returns 0,
 * or -1 for bad arguments or a failed allocation (nothing written). */
int few_rows_experts(const void *w1, const void *w3, const void *w2, const void *s1, const void *s3, const void *s2,
                     const void *b1, const void *b3, const void *b2, int wtype, long G, long E, const int64_t *idx,
                     const float *rw, long K, const void *res, const void *x, void *y, long M, long D, long I, int bf16,
                     int threads) {
    Expert base = {w1, w3, w2, s1, s3, s2, b1, b3, b2, wtype, G};
    if (M < 1 || M > LAYER_MAXM || K < 1 || E < 1 || bad_expert(base, D, I, bf16)) return -1;
    long P = M * K; /* (row, choice) pairs */
    for (long j = 0; j < P; j++)
        if (idx[j] < 0 || idx[j] >= E) return -1;
    size_t el = bf16 ? 2 : 4;
    char *xs = malloc(el * P * D), *ys = malloc(el * P * D), *ha = malloc(el * P * I), *hb = malloc(el * P * I);
    long *pair = malloc(sizeof(long) * P), *start = malloc(sizeof(long) * (P + 1)), *used = malloc(sizeof(long) * P);
    Act *hs = calloc((size_t)P, sizeof(Act)); /* the gated products, prepared per used expert */
    Act ax;
    memset(&ax, 0, sizeof ax);
    int failed = !xs || !ys || !ha || !hb || !pair || !start || !used || !hs;
    long n_used = 0;
    if (!failed) { /* the pairs grouped by expert (stable), their rows gathered and prepared at once */
        long n = 0;
        for (long e = 0; e < E; e++) {
            long n0 = n;
            for (long j = 0; j < P; j++)
                if (idx[j] == e) {
                    memcpy(xs + el * n * D, (const char *)x + el * (j / K) * D, el * D);
                    pair[n++] = j;
                }
            if (n > n0) used[n_used] = e, start[n_used++] = n0;
        }
        start[n_used] = n;
        failed = act_init(&ax, xs, P, D, bf16, wtype, G) != 0;
    }
    /* Where the gated products only need their address recorded (act_view), they are prepared
     * before the region, and w2 starts right after one barrier. */
    int view = act_view(bf16, wtype);
    for (long u = 0; !failed && view && u < n_used; u++)
        failed = act_init(&hs[u], ha + el * start[u] * I, start[u + 1] - start[u], I, bf16, wtype, G) != 0;
    if (!failed) {
        int bad = 0;
#pragma omp parallel num_threads(threads)
        {
            long v0, v1; /* hidden units of every used expert, one after the other: each thread a contiguous
                          * share, for which it runs w1, then w3, then the gating of the same units */
            share(n_used * I, &v0, &v1);
            for (long v = v0; v < v1;) {
                long u = v / I, i0 = v % I, i1 = v1 - v < I - i0 ? i0 + (v1 - v) : I;
                long r0 = start[u], n = start[u + 1] - r0;
                Expert ex = expert_at(base, used[u], D, I, bf16);
                Act a = act_rows(ax, r0, D);
                Out o1 = {ha + el * r0 * I, ex.s1, I, bf16, NULL, ex.b1};
                Out o3 = {hb + el * r0 * I, ex.s3, I, bf16, NULL, ex.b3};
                product(ex.w1, wtype, &a, o1, n, D, i0, i1);
                product(ex.w3, wtype, &a, o3, n, D, i0, i1);
                for (long r = r0; r < r0 + n; r++) /* silu(x @ w1.T) * (x @ w3.T) */
                    for (long j = r * I + i0; j < r * I + i1; j++) {
                        if (bf16) {
                            uint16_t *a16 = (uint16_t *)ha;
                            float g = round_bf16(silu(bf16_to_f32(a16[j])));
                            a16[j] = f32_to_bf16(g * bf16_to_f32(((const uint16_t *)hb)[j]));
                        } else {
                            float *af = (float *)ha;
                            af[j] = silu(af[j]) * ((const float *)hb)[j];
                        }
                    }
                v += i1 - i0;
            }
#pragma omp barrier
            if (!view) {
#pragma omp for schedule(dynamic, 1)
                for (long u = 0; u < n_used; u++) /* the gated products prepared for w2 (converted, rounded) */
                    if (act_init(&hs[u], ha + el * start[u] * I, start[u + 1] - start[u], I, bf16, wtype, G) != 0) {
#pragma omp atomic write
                        bad = 1;
                    }
            }
            if (!bad) { /* w2 of every used expert, one after the other: each thread a contiguous share */
                share(n_used * D, &v0, &v1);
                for (long v = v0; v < v1;) {
                    long u = v / D, d0 = v % D, d1 = v1 - v < D - d0 ? d0 + (v1 - v) : D;
                    long r0 = start[u], n = start[u + 1] - r0;
                    Expert ex = expert_at(base, used[u], D, I, bf16);
                    Out o = {ys + el * r0 * D, ex.s2, D, bf16, NULL, ex.b2};
                    product(ex.w2, wtype, &hs[u], o, n, I, d0, d1);
                    v += d1 - d0;
                }
            }
        }
        failed = bad;
    }
    if (!failed) {
        float *acc = calloc((size_t)P * D, sizeof(float)); /* acc[j]: the output of pair j, in pair order */
        if (!acc) failed = 1;
        for (long r = 0; !failed && r < P; r++)
            for (long d = 0; d < D; d++) acc[pair[r] * D + d] = at(ys, r * D + d, bf16);
        for (long m = 0; !failed && m < M; m++)
            for (long d = 0; d < D; d++) {
                float sum = 0;
                for (long j = 0; j < K; j++) {
                    float v = acc[(m * K + j) * D + d] * rw[m * K + j];
                    if (bf16) v = round_bf16(v);
                    sum = j == 0 ? v : sum + v;
                    if (bf16) sum = round_bf16(sum);
                }
                if (res) sum = at(res, m * D + d, bf16) + (bf16 ? round_bf16(sum) : sum);
                if (bf16)
                    ((uint16_t *)y)[m * D + d] = f32_to_bf16(sum);
                else
                    ((float *)y)[m * D + d] = sum;
            }
        free(acc);
    }
    for (long u = 0; hs && u < n_used; u++) free(hs[u].mem);
    free(hs);
    free(ax.mem);
    free(xs);
    free(ys);
    free(ha);
    free(hb);
    free(pair);
    free(start);
    free(used);
    return failed ? -1 : 0;
}
