/* Few-row products with group-wise int4 weights (model/quant4.py's format), and the chosen int4
 * experts of a few rows.
 *
 * Weights [O, I]: codes packed two to a byte in blocks of 32 inputs (byte j of a block: input j in
 * the low nibble, input j + 16 in the high one), a float16 scale s and offset b per group of G
 * inputs: w = q * s + b. So per row and group
 *     sum_k x_k w_k = s * sum_k x_k q_k + b * sum_k x_k,
 * and the group sums of x are computed once per activation row.
 *
 * With AVX2 the activations are rounded to int8, one scale per group (xs = max|x| / 127, an error
 * of at most xs / 2 per element, as llama.cpp's Q8 activations; the group sums are those of the
 * rounded values, so the result is the exact product with rounded activations), and a block of 32 weights costs a
 * broadcast load, a shift, a blend and a mask to unpack the codes into a register, then one
 * vpmaddubsw per activation row (unsigned codes times signed activations, pairs summed in 16
 * bits: at most 2 * 15 * 127 per lane, so eight blocks add up in 16 bits before one vpmaddwd
 * widens them). Without AVX2 (or for rows holding inf or NaN) a scalar float32 loop dequantises
 * each weight. Sums are float32; the output is rounded once to the activations' dtype. */
#include "kernel.h"

#if defined(__F16C__)
static inline float half_to_f32(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float half_to_f32(uint16_t h) { /* IEEE binary16 -> binary32, subnormals included */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0x1f) u = sign | 0x7f800000u | (man << 13);
    else if (exp) u = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) u = sign;
    else {
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400u));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}
#endif

/* M rows of activations prepared for int4 products of I inputs in groups of G. */
typedef struct {
    const float *f; /* float32 rows [M, I] (the scalar loop) */
    int8_t *q;      /* int8 rows [M, I] (AVX2), or NULL */
    float *qs;      /* [M, I / G] the int8 scale of each group */
    float *sum;     /* [M, I / G] the sum of each group (of the int8 values, scaled, with AVX2) */
    void *mem;
} Act4;

static int act4_init(Act4 *a, const void *x, long M, long I, long G, int bf16) {
    long ng = I / G;
    memset(a, 0, sizeof *a);
    char *mem = malloc(sizeof(float) * M * I * (bf16 ? 1 : 0) + sizeof(float) * 2 * M * ng + (size_t)M * I);
    if (!mem) return -1;
    a->mem = mem;
    float *f = bf16 ? (float *)mem : (float *)x;
    char *p = mem + (bf16 ? sizeof(float) * M * I : 0);
    a->qs = (float *)p, a->sum = (float *)p + M * ng;
    int8_t *q = (int8_t *)(p + sizeof(float) * 2 * M * ng);
    if (bf16)
        for (long i = 0; i < M * I; i++) f[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    a->f = f;
    int finite = 1;
    for (long m = 0; m < M; m++)
        for (long g = 0; g < ng; g++) {
            const float *xg = f + m * I + g * G;
            float amax = 0, s = 0;
            for (long k = 0; k < G; k++) {
                s += xg[k];
                if (!(fabsf(xg[k]) <= amax)) amax = fabsf(xg[k]); /* NaN makes amax NaN */
            }
            a->sum[m * ng + g] = s;
            if (!isfinite(amax)) finite = 0;
            float inv = amax > 0 ? 127.0f / amax : 0.0f;
            a->qs[m * ng + g] = amax / 127.0f;
            int qsum = 0;
            for (long k = 0; finite && k < G; k++) {
                int8_t v = (int8_t)nearbyintf(xg[k] * inv);
                q[m * I + g * G + k] = v;
                qsum += v;
            }
            /* the offsets multiply the rounded activations too: the error is then sum dx * w, not
             * sum dx * (w - b) (the codes' part alone is far from zero-mean) */
            if (finite) a->sum[m * ng + g] = (float)qsum * a->qs[m * ng + g];
        }
#if defined(__AVX2__)
    if (finite) a->q = q;
#endif
    return 0;
}

/* The raw sums (before store) of weight row o against the rows m0 .. m0 + MM - 1. */
#if defined(__AVX2__)
#if defined(__FMA__)
#define FMADD(a, b, c) _mm256_fmadd_ps(a, b, c)
#else
#define FMADD(a, b, c) _mm256_add_ps(_mm256_mul_ps(a, b), c)
#endif
#define DOT4(MM)                                                                                     \
    static inline void dot4_##MM(const uint8_t *restrict wr, const uint16_t *restrict sr,           \
                                 const uint16_t *restrict br, const Act4 *a, long m0, long I, long G, \
                                 float *restrict out) {                                              \
        long ng = I / G;                                                                             \
        __m256 f[MM];                                                                                \
        float bsum[MM];                                                                              \
        for (int m = 0; m < MM; m++) f[m] = _mm256_setzero_ps(), bsum[m] = 0;                        \
        const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);                     \
        for (long g = 0; g < ng; g++) {                                                              \
            float s = half_to_f32(sr[g]), b = half_to_f32(br[g]);                                    \
            __m256i acc[MM];                                                                         \
            for (int m = 0; m < MM; m++) acc[m] = _mm256_setzero_si256();                            \
            for (long k0 = g * G; k0 < (g + 1) * G; k0 += 256) {                                     \
                long k1 = k0 + 256 < (g + 1) * G ? k0 + 256 : (g + 1) * G;                           \
                __m256i h[MM];                                                                       \
                for (int m = 0; m < MM; m++) h[m] = _mm256_setzero_si256();                          \
                for (long k = k0; k < k1; k += 32) {                                                 \
                    __m256i p = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(wr + k / 2))); \
                    __m256i c = _mm256_and_si256(_mm256_blend_epi32(p, _mm256_srli_epi16(p, 4), 0xf0), low); \
                    for (int m = 0; m < MM; m++)                                                     \
                        h[m] = _mm256_add_epi16(h[m], _mm256_maddubs_epi16(c,                        \
                            _mm256_loadu_si256((const __m256i *)(a->q + (m0 + m) * I + k))));         \
                }                                                                                    \
                for (int m = 0; m < MM; m++) acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(h[m], ones)); \
            }                                                                                        \
            for (int m = 0; m < MM; m++) {                                                           \
                long j = (m0 + m) * ng + g;                                                          \
                f[m] = FMADD(_mm256_cvtepi32_ps(acc[m]), _mm256_set1_ps(s * a->qs[j]), f[m]); \
                bsum[m] += b * a->sum[j];                                                            \
            }                                                                                        \
        }                                                                                            \
        for (int m = 0; m < MM; m++) {                                                               \
            __m128 v = _mm_add_ps(_mm256_castps256_ps128(f[m]), _mm256_extractf128_ps(f[m], 1));    \
            v = _mm_add_ps(v, _mm_movehl_ps(v, v));                                                  \
            v = _mm_add_ss(v, _mm_movehdup_ps(v));                                                   \
            out[m] = _mm_cvtss_f32(v) + bsum[m];                                                     \
        }                                                                                            \
    }
DOT4(1)
DOT4(2)
DOT4(3)
DOT4(4)

/* With AVX512-VNNI: 64 codes (two blocks) per register, and vpdpbusd multiplies unsigned codes by
 * signed activations and adds groups of four straight into int32 lanes: about half the
 * instructions per weight of the AVX2 loop. A group of 32 (one block) takes the 256-bit form. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HAVE_VNNI4 1
#define DOTV(MM)                                                                                     \
    static inline void dotv_##MM(const uint8_t *restrict wr, const uint16_t *restrict sr,           \
                                 const uint16_t *restrict br, const Act4 *a, long m0, long I, long G, \
                                 float *restrict out) {                                              \
        long ng = I / G;                                                                             \
        __m512 f[MM];                                                                                \
        float bsum[MM];                                                                              \
        for (int m = 0; m < MM; m++) f[m] = _mm512_setzero_ps(), bsum[m] = 0;                        \
        const __m256i low8 = _mm256_set1_epi8(0x0f);                                                 \
        for (long g = 0; g < ng; g++) {                                                              \
            float s = half_to_f32(sr[g]), b = half_to_f32(br[g]);                                    \
            __m512i acc[MM];                                                                         \
            for (int m = 0; m < MM; m++) acc[m] = _mm512_setzero_si512();                            \
            long k = g * G, end = (g + 1) * G;                                                       \
            for (; k + 64 <= end; k += 64) {                                                         \
                __m256i p = _mm256_loadu_si256((const __m256i *)(wr + k / 2));                       \
                __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(p, low8)),   \
                                               _mm256_and_si256(_mm256_srli_epi16(p, 4), low8), 1);  \
                __m512i c = _mm512_shuffle_i64x2(z, z, 0xd8);                                        \
                for (int m = 0; m < MM; m++)                                                         \
                    acc[m] = _mm512_dpbusd_epi32(acc[m], c,                                          \
                        _mm512_loadu_si512((const void *)(a->q + (m0 + m) * I + k)));                \
            }                                                                                        \
            if (k < end) { /* one block of 32 left */                                                \
                __m256i p = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(wr + k / 2))); \
                __m256i c = _mm256_and_si256(_mm256_blend_epi32(p, _mm256_srli_epi16(p, 4), 0xf0), low8); \
                for (int m = 0; m < MM; m++)                                                         \
                    acc[m] = _mm512_add_epi32(acc[m], _mm512_castsi256_si512(_mm256_dpbusd_epi32(    \
                        _mm256_setzero_si256(), c,                                                   \
                        _mm256_loadu_si256((const __m256i *)(a->q + (m0 + m) * I + k)))));          \
            }                                                                                        \
            for (int m = 0; m < MM; m++) {                                                           \
                long j = (m0 + m) * ng + g;                                                          \
                f[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_set1_ps(s * a->qs[j]), f[m]); \
                bsum[m] += b * a->sum[j];                                                            \
            }                                                                                        \
        }                                                                                            \
        for (int m = 0; m < MM; m++) out[m] = _mm512_reduce_add_ps(f[m]) + bsum[m];                  \
    }
DOTV(1)
DOTV(2)
DOTV(3)
DOTV(4)
#else
#define HAVE_VNNI4 0
#endif
#endif

/* The scalar loop: each weight dequantised to float32, times the float32 activations. */
static float dot4_scalar(const uint8_t *wr, const uint16_t *sr, const uint16_t *br, const float *x, long I, long G) {
    float total = 0;
    for (long g = 0; g < I / G; g++) {
        float s = half_to_f32(sr[g]), b = half_to_f32(br[g]), acc = 0;
        for (long k = g * G; k < (g + 1) * G; k++) {
            long blk = k / 32 * 32, j = k - blk;
            uint8_t byte = wr[blk / 2 + (j & 15)];
            float w = (float)(j < 16 ? byte & 15 : byte >> 4) * s + b;
            acc += w * x[k];
        }
        total += acc;
    }
    return total;
}

/* Outputs [o0, o1) of x @ w.T for the M rows of x (one thread's share). */
static void product4(const uint8_t *w, const uint16_t *s, const uint16_t *b, const Act4 *a, Out out, long M, long I,
                     long G, long o0, long o1) {
    long ng = I / G;
    for (long o = o0; o < o1; o++) {
        const uint8_t *wr = w + o * (I / 2);
        const uint16_t *sr = s + o * ng, *br = b + o * ng;
        if (a->q) {
#if defined(__AVX2__)
            for (long m = 0; m < M;) {
                float r[4];
                long mm = M - m > 4 ? 4 : M - m;
#if HAVE_VNNI4
                switch (mm) {
                case 1: dotv_1(wr, sr, br, a, m, I, G, r); break;
                case 2: dotv_2(wr, sr, br, a, m, I, G, r); break;
                case 3: dotv_3(wr, sr, br, a, m, I, G, r); break;
                default: dotv_4(wr, sr, br, a, m, I, G, r); break;
                }
#else
                switch (mm) {
                case 1: dot4_1(wr, sr, br, a, m, I, G, r); break;
                case 2: dot4_2(wr, sr, br, a, m, I, G, r); break;
                case 3: dot4_3(wr, sr, br, a, m, I, G, r); break;
                default: dot4_4(wr, sr, br, a, m, I, G, r); break;
                }
#endif
                for (long j = 0; j < mm; j++) store(out, m + j, o, r[j]);
                m += mm;
            }
#endif
        } else {
            for (long m = 0; m < M; m++) store(out, m, o, dot4_scalar(wr, sr, br, a->f + m * I, I, G));
        }
    }
}

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
    Act4 a;
    if (act4_init(&a, x, M, I, G, bf16) != 0) return -1;
    Out out = {y, NULL, O, bf16, NULL};
#pragma omp parallel num_threads(threads)
    {
        long o0, o1;
        share(O, &o0, &o1);
        product4(w, s, b, &a, out, M, I, G, o0, o1);
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
    Act4 ax;
    if (act4_init(&ax, x, M, D, G, bf16) != 0) return -1;
    float *ha = malloc(sizeof(float) * I), *hb = malloc(sizeof(float) * I), *yo = malloc(sizeof(float) * D);
    float *acc = calloc((size_t)M * D, sizeof(float));
    Act4 ah;
    memset(&ah, 0, sizeof ah);
    int failed = !ha || !hb || !yo || !acc;
    long ngd = D / G, ngi = I / G;
    for (long m = 0; !failed && m < M; m++)
        for (long j = 0; !failed && j < K; j++) {
            long e = idx[m * K + j];
            Act4 xm = ax; /* row m only */
            xm.f += m * D, xm.qs += m * ngd, xm.sum += m * ngd;
            if (xm.q) xm.q += m * D;
            Out oa = {ha, NULL, I, 0, NULL}, ob = {hb, NULL, I, 0, NULL}, oy = {yo, NULL, D, 0, NULL};
#pragma omp parallel num_threads(threads)
            {
                long i0, i1;
                share(I, &i0, &i1);
                product4(w1 + e * I * (D / 2), s1 + e * I * ngd, b1 + e * I * ngd, &xm, oa, 1, D, G, i0, i1);
                product4(w3 + e * I * (D / 2), s3 + e * I * ngd, b3 + e * I * ngd, &xm, ob, 1, D, G, i0, i1);
                for (long i = i0; i < i1; i++) ha[i] = silu(ha[i]) * hb[i];
#pragma omp barrier
#pragma omp single
                {
                    free(ah.mem);
                    failed = act4_init(&ah, ha, 1, I, G, 0) != 0;
                }
                if (!failed) {
                    long d0, d1;
                    share(D, &d0, &d1);
                    product4(w2 + e * D * (I / 2), s2 + e * D * ngi, b2 + e * D * ngi, &ah, oy, 1, I, G, d0, d1);
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
