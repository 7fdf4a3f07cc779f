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
 * row-major (w[o, k] at o * I + k). x [M, I] and y [M, O] are row-major, both bfloat16 or both
 * float32 (the scale too).
 *
 * Entries: few_rows (one product), few_rows_swiglu (one expert), few_rows_experts (the chosen
 * experts of every row, weighted and summed), few_rows_qkv (attention projections and rotary
 * embedding), few_rows_attention (decode attention against the cache), few_rows_rmsnorm.
 */
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#define V 16   /* floats per vector */
#define MAXM 8 /* rows of x per call */

typedef float vf __attribute__((vector_size(V * 4)));
typedef uint32_t vu __attribute__((vector_size(V * 4)));
typedef uint16_t vh __attribute__((vector_size(V * 2)));
typedef int8_t vq __attribute__((vector_size(V)));
typedef int32_t vi __attribute__((vector_size(V * 4)));

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline vf load_f32(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf v;
    memcpy(&v, &u, sizeof v);
    return v;
}

static inline vf load_i8(const int8_t *p) { /* sign-extend to int32, convert: exact */
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
    vf v;
    memcpy(&v, &lo, 32);
    memcpy((char *)&v + 32, &hi, 32);
    return v;
#else /* compilers turn the generic char-vector conversion into scalar code */
    vq q;
    memcpy(&q, p, sizeof q);
    return __builtin_convertvector(__builtin_convertvector(q, vi), vf);
#endif
}

static inline float scalar_bf16(uint16_t h) { return bf16_to_f32(h); }
static inline float scalar_f32(float f) { return f; }
static inline float scalar_i8(int8_t q) { return (float)q; }

static inline float hsum(vf a) {
    float s = 0;
    for (int j = 0; j < V; j++) s += a[j];
    return s;
}

/* x[0..n) as float32 from bfloat16 (bf16 = 1) or float32. */
static inline float at(const void *x, long i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

static inline vf load_any(const void *x, long i, int bf16) {
    return bf16 ? load_bf16((const uint16_t *)x + i) : load_f32((const float *)x + i);
}

/* Where results go: y[m, o] = sum * scale[o] (no scale: sum), stored as bfloat16 or float32. */
typedef struct {
    void *y;
    const void *scale;
    long O;
    int bf16;
    const void *res; /* a residual [M, O] to add (after the product's own rounding), or NULL */
} Out;

static inline void store(Out out, long m, long o, float s) {
    if (out.scale) s *= out.bf16 ? bf16_to_f32(((const uint16_t *)out.scale)[o]) : ((const float *)out.scale)[o];
    if (out.res) {
        if (out.bf16)
            s = bf16_to_f32(((const uint16_t *)out.res)[m * out.O + o]) + bf16_to_f32(f32_to_bf16(s));
        else
            s = ((const float *)out.res)[m * out.O + o] + s;
    }
    if (out.bf16)
        ((uint16_t *)out.y)[m * out.O + o] = f32_to_bf16(s);
    else
        ((float *)out.y)[m * out.O + o] = s;
}

/* Outputs [o0, o1) for rows m0 .. m0+MM-1 of float32 x: each a dot product along a weight row, two
 * accumulators per row so consecutive multiply-adds do not wait on each other. */
#define ROWS(T, SFX, MM)                                                                             \
    __attribute__((noinline)) static void rows_##SFX##_##MM(const T *restrict w, const float *restrict x, \
        Out out, long m0, long I, long o0, long o1) {                                                \
        for (long o = o0; o < o1; o++) {                                                             \
            const T *wr = w + o * I;                                                                 \
            vf a[MM], b[MM];                                                                         \
            for (int m = 0; m < MM; m++) a[m] = b[m] = (vf){0};                                      \
            long k = 0;                                                                              \
            for (; k + 2 * V <= I; k += 2 * V) {                                                     \
                vf w0 = load_##SFX(wr + k), w1 = load_##SFX(wr + k + V);                             \
                for (int m = 0; m < MM; m++) {                                                       \
                    a[m] += w0 * load_f32(x + (m0 + m) * I + k);                                     \
                    b[m] += w1 * load_f32(x + (m0 + m) * I + k + V);                                 \
                }                                                                                    \
            }                                                                                        \
            for (int m = 0; m < MM; m++) {                                                           \
                float s = hsum(a[m] + b[m]);                                                         \
                for (long kk = k; kk < I; kk++) s += scalar_##SFX(wr[kk]) * x[(m0 + m) * I + kk];    \
                store(out, m0 + m, o, s);                                                            \
            }                                                                                        \
        }                                                                                            \
    }

/* The rows of x four at a time (more accumulators than registers otherwise). */
#define RUN(T, SFX)                                                                                  \
    ROWS(T, SFX, 1)                                                                                  \
    ROWS(T, SFX, 2)                                                                                  \
    ROWS(T, SFX, 3)                                                                                  \
    ROWS(T, SFX, 4)                                                                                  \
    static void run_##SFX(const T *w, const float *x, Out out, long M, long I, long o0, long o1) {  \
        for (long m = 0; m < M;) {                                                                   \
            switch (M - m) {                                                                         \
            case 1: rows_##SFX##_1(w, x, out, m, I, o0, o1); m += 1; break;                         \
            case 2: rows_##SFX##_2(w, x, out, m, I, o0, o1); m += 2; break;                         \
            case 3: rows_##SFX##_3(w, x, out, m, I, o0, o1); m += 3; break;                         \
            default: rows_##SFX##_4(w, x, out, m, I, o0, o1); m += 4; break;                        \
            }                                                                                        \
        }                                                                                            \
    }

RUN(uint16_t, bf16)
RUN(float, f32)
RUN(int8_t, i8)

/* With AVX512-BF16 (-march=native on such a CPU), bfloat16 rows multiply pairs of bfloat16 values
 * straight into float32 sums (vdpbf16ps: 32 products per instruction, no conversion): twice the
 * arithmetic of the loop above, which several rows of x need. Same sums (the product of two
 * bfloat16 values is exact in float32), another order; subnormal inputs count as zero. */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define HAVE_DPBF16 1
#define DP(MM)                                                                                       \
    static inline void dp_##MM(const uint16_t *restrict wr, const uint16_t *restrict x, Out out,    \
                               long m0, long I, long o) {                                            \
        const uint16_t *xm = x + m0 * I;                                                             \
        __m512 a[MM], b[MM];                                                                         \
        for (int m = 0; m < MM; m++) a[m] = b[m] = _mm512_setzero_ps();                              \
        long k = 0;                                                                                  \
        for (; k + 64 <= I; k += 64) {                                                               \
            __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k);                                     \
            __m512bh w1 = (__m512bh)_mm512_loadu_si512(wr + k + 32);                                \
            for (int m = 0; m < MM; m++) {                                                           \
                a[m] = _mm512_dpbf16_ps(a[m], w0, (__m512bh)_mm512_loadu_si512(xm + m * I + k));      \
                b[m] = _mm512_dpbf16_ps(b[m], w1, (__m512bh)_mm512_loadu_si512(xm + m * I + k + 32)); \
            }                                                                                        \
        }                                                                                            \
        for (; k + 32 <= I; k += 32) {                                                               \
            __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k);                                     \
            for (int m = 0; m < MM; m++)                                                             \
                a[m] = _mm512_dpbf16_ps(a[m], w0, (__m512bh)_mm512_loadu_si512(xm + m * I + k));      \
        }                                                                                            \
        for (int m = 0; m < MM; m++) {                                                               \
            float s = _mm512_reduce_add_ps(_mm512_add_ps(a[m], b[m]));                               \
            for (long kk = k; kk < I; kk++) s += bf16_to_f32(wr[kk]) * bf16_to_f32(xm[m * I + kk]);  \
            store(out, m0 + m, o, s);                                                                \
        }                                                                                            \
    }
DP(1)
DP(2)
DP(3)

/* Per weight row, the rows of x three at a time (four measured slower); the weight row stays in the
 * L1 cache between groups. */
static void run_dp(const uint16_t *w, const uint16_t *x, Out out, long M, long I, long o0, long o1) {
    for (long o = o0; o < o1; o++) {
        const uint16_t *wr = w + o * I;
        for (long m = 0; m < M;) {
            switch (M - m) {
            case 1: dp_1(wr, x, out, m, I, o); m += 1; break;
            case 2: dp_2(wr, x, out, m, I, o); m += 2; break;
            default: dp_3(wr, x, out, m, I, o); m += 3; break;
            }
        }
    }
}
#else
#define HAVE_DPBF16 0
#endif

/* With AVX512-VNNI, int8 weights multiply pairs of 16-bit integers straight into int32 sums
 * (vpdpwssd: 32 products per instruction after one sign extension of the weights), instead of a
 * conversion to float32 per weight: the int8 loop then streams at memory speed, not at the speed of
 * the conversions. The activations are rounded to int16 for it, one scale per row (q = round(x / s),
 * s = max|x| / 32767): an error of at most max|x| / 65534 per element, below bfloat16's rounding of
 * every element larger than max|x| / 128, and far below the int8 weights' own error. Each int32 lane
 * takes at most CHUNK / 64 sums of two products (|q_x * q_w| <= 32767 * 127) before it is added to
 * a float32 total, so nothing overflows. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_VNNI 1
#define CHUNK 8192
#define QD(MM)                                                                                       \
    static inline void qd_##MM(const int8_t *restrict wr, const int16_t *restrict xq,                \
                               const float *restrict xs, Out out, long m0, long I, long o) {         \
        const int16_t *xm = xq + m0 * I;                                                             \
        __m512 f[MM];                                                                                \
        for (int m = 0; m < MM; m++) f[m] = _mm512_setzero_ps();                                     \
        long i32 = I / 32 * 32, k = 0;                                                               \
        while (k < i32) {                                                                            \
            long end = k + CHUNK < i32 ? k + CHUNK : i32;                                            \
            __m512i a[MM], b[MM];                                                                    \
            for (int m = 0; m < MM; m++) a[m] = b[m] = _mm512_setzero_si512();                       \
            for (; k + 64 <= end; k += 64) {                                                         \
                __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wr + k)));    \
                __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wr + k + 32))); \
                for (int m = 0; m < MM; m++) {                                                       \
                    a[m] = _mm512_dpwssd_epi32(a[m], w0, _mm512_loadu_si512(xm + m * I + k));        \
                    b[m] = _mm512_dpwssd_epi32(b[m], w1, _mm512_loadu_si512(xm + m * I + k + 32));   \
                }                                                                                    \
            }                                                                                        \
            for (; k + 32 <= end; k += 32) {                                                         \
                __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wr + k)));    \
                for (int m = 0; m < MM; m++)                                                         \
                    a[m] = _mm512_dpwssd_epi32(a[m], w0, _mm512_loadu_si512(xm + m * I + k));        \
            }                                                                                        \
            for (int m = 0; m < MM; m++)                                                             \
                f[m] = _mm512_add_ps(f[m], _mm512_add_ps(_mm512_cvtepi32_ps(a[m]), _mm512_cvtepi32_ps(b[m]))); \
        }                                                                                            \
        for (int m = 0; m < MM; m++) {                                                               \
            float s = _mm512_reduce_add_ps(f[m]);                                                    \
            for (long kk = i32; kk < I; kk++) s += (float)(wr[kk] * xm[m * I + kk]);                 \
            store(out, m0 + m, o, s * xs[m0 + m]);                                                   \
        }                                                                                            \
    }
QD(1)
QD(2)
QD(3)

static void run_qd(const int8_t *w, const int16_t *xq, const float *xs, Out out, long M, long I, long o0, long o1) {
    for (long o = o0; o < o1; o++) {
        const int8_t *wr = w + o * I;
        for (long m = 0; m < M;) {
            switch (M - m) {
            case 1: qd_1(wr, xq, xs, out, m, I, o); m += 1; break;
            case 2: qd_2(wr, xq, xs, out, m, I, o); m += 2; break;
            default: qd_3(wr, xq, xs, out, m, I, o); m += 3; break;
            }
        }
    }
}
#else
#define HAVE_VNNI 0
#endif

/* Whether int8 products use vpdpwssd on int16 activations (1) or the float32 loop (0). */
int few_rows_vnni(void) { return HAVE_VNNI; }

/* Whether bfloat16 products use vdpbf16ps (1) or the float32 loop (0). */
int few_rows_dpbf16(void) { return HAVE_DPBF16; }

enum { W_F32 = 0, W_BF16 = 1, W_INT8 = 2 };

/* The activations in the form the loop for a weight type reads: bfloat16 as given (vdpbf16ps),
 * int16 with one scale per row (vpdpwssd), or float32 (the generic loops; bfloat16 rows are
 * converted once, they are few). */
typedef struct {
    const uint16_t *bf;
    const int16_t *q;
    const float *qs;
    const float *f;
    void *mem; /* what act_init allocated */
} Act;

/* Rounds M rows of x to int16, one scale per row; returns 0, or -1 if a row holds inf or NaN (the
 * float32 loop then carries them through as PyTorch would). */
static int quantize_rows(const void *x, int bf16, long M, long I, int16_t *q, float *qs) {
    for (long m = 0; m < M; m++) {
        float amax = 0;
        for (long k = 0; k < I; k++) {
            float v = bf16 ? bf16_to_f32(((const uint16_t *)x)[m * I + k]) : ((const float *)x)[m * I + k];
            v = fabsf(v);
            if (v > amax) amax = v;
            else if (v != v) return -1;
        }
        if (!isfinite(amax)) return -1;
        qs[m] = amax / 32767.0f;
        float inv = amax > 0 ? 32767.0f / amax : 0.0f;
        for (long k = 0; k < I; k++) {
            float v = bf16 ? bf16_to_f32(((const uint16_t *)x)[m * I + k]) : ((const float *)x)[m * I + k];
            float r = nearbyintf(v * inv);
            q[m * I + k] = (int16_t)(r > 32767.0f ? 32767.0f : r < -32767.0f ? -32767.0f : r);
        }
    }
    return 0;
}

/* Prepares x [M, I] (bfloat16 if bf16, else float32) for products with wtype weights; 0, or -1 for
 * a failed allocation. Free a->mem afterwards. */
static int act_init(Act *a, const void *x, long M, long I, int bf16, int wtype) {
    memset(a, 0, sizeof *a);
    if (HAVE_DPBF16 && wtype == W_BF16) {
        a->bf = (const uint16_t *)x;
        return 0;
    }
    if (HAVE_VNNI && wtype == W_INT8) {
        char *mem = malloc(sizeof(int16_t) * M * I + sizeof(float) * M);
        if (!mem) return -1;
        float *qs = (float *)mem;
        int16_t *q = (int16_t *)(mem + sizeof(float) * M);
        if (quantize_rows(x, bf16, M, I, q, qs) == 0) {
            a->q = q, a->qs = qs, a->mem = mem;
            return 0;
        }
        free(mem);
    }
    if (!bf16) {
        a->f = (const float *)x;
        return 0;
    }
    float *f = malloc(sizeof(float) * M * I);
    if (!f) return -1;
    for (long i = 0; i < M * I; i++) f[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    a->f = f, a->mem = f;
    return 0;
}

/* Outputs [o0, o1) of x @ w.T for the M rows of x (one thread's share). */
static void product(const void *w, int wtype, const Act *x, Out out, long M, long I, long o0, long o1) {
    if (o0 >= o1) return;
#if HAVE_DPBF16
    if (x->bf) {
        run_dp((const uint16_t *)w, x->bf, out, M, I, o0, o1);
        return;
    }
#endif
#if HAVE_VNNI
    if (x->q) {
        run_qd((const int8_t *)w, x->q, x->qs, out, M, I, o0, o1);
        return;
    }
#endif
    if (wtype == W_BF16)
        run_bf16((const uint16_t *)w, x->f, out, M, I, o0, o1);
    else if (wtype == W_INT8)
        run_i8((const int8_t *)w, x->f, out, M, I, o0, o1);
    else
        run_f32((const float *)w, x->f, out, M, I, o0, o1);
}

/* This thread's share [*o0, *o1) of O outputs, in multiples of V so no two threads share a cache
 * line of the output. */
static void share(long O, long *o0, long *o1) {
    long n = omp_get_num_threads(), t = omp_get_thread_num();
    long blocks = (O + V - 1) / V;
    *o0 = blocks * t / n * V;
    *o1 = blocks * (t + 1) / n * V;
    if (*o1 > O) *o1 = O;
}

static int bad_types(int wtype, const void *scale, int bf16) {
    return (wtype == W_INT8) != (scale != NULL) || (wtype == W_BF16 && !bf16) || (wtype == W_F32 && bf16) ||
           wtype < W_F32 || wtype > W_INT8;
}

/* y = (x @ w.T) [* scale] for M (1..MAXM) rows. wtype: W_F32, W_BF16 or W_INT8 (scale required);
 * bf16: x, y and scale are bfloat16 (1) or float32 (0). Returns 0, or -1 for bad arguments or a
 * failed allocation (nothing written). */
int few_rows(const void *w, int wtype, const void *scale, const void *x, void *y, long M, long O, long I, int bf16,
             int threads) {
    if (M < 1 || M > MAXM || bad_types(wtype, scale, bf16)) return -1;
    Act a;
    if (act_init(&a, x, M, I, bf16, wtype) != 0) return -1;
    Out out = {y, scale, O, bf16, NULL};
#pragma omp parallel num_threads(threads)
    {
        long o0, o1;
        share(O, &o0, &o1);
        product(w, wtype, &a, out, M, I, o0, o1);
    }
    free(a.mem);
    return 0;
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

static inline float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

/* One SwiGLU expert's weights: w1, w3 [I, D] and w2 [D, I] of type wtype (int8: with scales s1, s3
 * [I] and s2 [D]; else NULL). */
typedef struct {
    const void *w1, *w3, *w2, *s1, *s3, *s2;
    int wtype;
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
    Out oa = {t->a, ex.s1, I, bf16, NULL}, ob = {t->b, ex.s3, I, bf16, NULL}, oy = {y, ex.s2, D, bf16, NULL};
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
        t->failed = act_init(&t->h, t->a, M, I, bf16, ex.wtype) != 0;
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

static int bad_expert(Expert ex, int bf16) {
    return bad_types(ex.wtype, ex.s1, bf16) || (ex.s1 == NULL) != (ex.s3 == NULL) || (ex.s1 == NULL) != (ex.s2 == NULL);
}

/* One SwiGLU expert on M (1..MAXM) rows: y = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T (see Expert and
 * swiglu_team), x and y bfloat16 (bf16 = 1) or float32. Returns 0, or -1 for bad arguments or a
 * failed allocation (nothing written). */
int few_rows_swiglu(const void *w1, const void *w3, const void *w2, const void *s1, const void *s3, const void *s2,
                    int wtype, const void *x, void *y, long M, long D, long I, int bf16, int threads) {
    Expert ex = {w1, w3, w2, s1, s3, s2, wtype};
    if (M < 1 || M > MAXM || bad_expert(ex, bf16)) return -1;
    Team t;
    Act ax;
    if (team_init(&t, M, I, bf16) != 0 || act_init(&ax, x, M, D, bf16, wtype) != 0) {
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

/* The mixture of M (1..MAXM) rows: y[m] = sum_j rw[m, j] * expert_{idx[m, j]}(x[m]) over the K chosen
 * experts of each row, from stacked weights (expert e at e * I * D elements of w1, w3 and w2; scales
 * at e * I and e * D). Rows that chose the same expert run through it together, so each chosen
 * expert's weights are read once. Rounding as the plain code's: each expert output rounded to the
 * dtype, times its float32 weight rounded, added in the order of j, each sum rounded. idx: int64
 * [M, K] in [0, E); rw: float32 [M, K]; res: a residual [M, D] added last (as PyTorch's add), or
 * NULL. Returns 0, or -1 for bad arguments or a failed allocation (nothing written). */
int few_rows_experts(const void *w1, const void *w3, const void *w2, const void *s1, const void *s3, const void *s2,
                     int wtype, long E, const int64_t *idx, const float *rw, long K, const void *res, const void *x,
                     void *y, long M, long D, long I, int bf16, int threads) {
    Expert base = {w1, w3, w2, s1, s3, s2, wtype};
    if (M < 1 || M > MAXM || K < 1 || E < 1 || bad_expert(base, bf16)) return -1;
    long P = M * K; /* (row, choice) pairs */
    for (long j = 0; j < P; j++)
        if (idx[j] < 0 || idx[j] >= E) return -1;
    size_t el = bf16 ? 2 : 4, wel = wtype == W_INT8 ? 1 : el;
    char *xs = malloc(el * P * D), *ys = malloc(el * P * D);
    long *pair = malloc(sizeof(long) * P), *start = malloc(sizeof(long) * (E + 1));
    Team t;
    Act ax;
    memset(&ax, 0, sizeof ax);
    int failed = team_init(&t, M, I, bf16) != 0 || !xs || !ys || !pair || !start;
    if (!failed) { /* the pairs grouped by expert (stable), their rows gathered and prepared at once */
        long n = 0;
        for (long e = 0; e < E; e++) {
            start[e] = n;
            for (long j = 0; j < P; j++)
                if (idx[j] == e) {
                    memcpy(xs + el * n * D, (const char *)x + el * (j / K) * D, el * D);
                    pair[n++] = j;
                }
        }
        start[E] = n;
        failed = act_init(&ax, xs, P, D, bf16, wtype) != 0;
    }
    if (!failed) {
#pragma omp parallel num_threads(threads)
        for (long e = 0; e < E && !t.failed; e++) {
            long r0 = start[e], n = start[e + 1] - r0;
            if (n == 0) continue;
            Act a = ax; /* the rows of this expert */
            if (a.bf) a.bf += r0 * D;
            if (a.q) a.q += r0 * D, a.qs += r0;
            if (a.f) a.f += r0 * D;
            Expert ex = base;
            ex.w1 = (const char *)w1 + wel * e * I * D;
            ex.w3 = (const char *)w3 + wel * e * I * D;
            ex.w2 = (const char *)w2 + wel * e * I * D;
            if (s1) {
                ex.s1 = (const char *)s1 + el * e * I;
                ex.s3 = (const char *)s3 + el * e * I;
                ex.s2 = (const char *)s2 + el * e * D;
            }
            swiglu_team(ex, &a, &t, ys + el * r0 * D, n, D, I, bf16);
        }
        failed = t.failed;
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
    free(ax.mem);
    team_free(&t);
    free(xs);
    free(ys);
    free(pair);
    free(start);
    return failed ? -1 : 0;
}

/* RMSNorm of M rows of D values (decoding: a few rows, one thread), in Hugging Face's order of
 * rounding: bfloat16 (bf16 = 1) y = bf16(w * bf16(x * r)), float32 y = x * r * w, with
 * r = 1 / sqrt(mean(x^2) + eps) in float32. x, w and y share the dtype. */
void few_rows_rmsnorm(const void *x, const void *w, void *y, long M, long D, float eps, int bf16);

/* Attention for one (batch row b, head h, query t) unit, see few_rows_attention; p [S], qf and
 * acc [hd] are the caller's scratch. */
static void attend(const void *q, long q0, const void *k, const void *v, const void *mask, void *y, long b, long h,
                   long t, long H, long KV, long T, long S, long hd, float scale, int bf16, float *p, float *qf,
                   float *acc) {
    long g = h / (H / KV);
    for (long d = 0; d < hd; d++) qf[d] = at(q, q0 + d, bf16);
    long kv0 = (b * KV + g) * S * hd, m0 = (b * T + t) * S;
    float mx = -INFINITY;
    for (long s = 0; s < S; s++) {
        float bias = at(mask, m0 + s, bf16);
        if (bias == -INFINITY) {
            p[s] = -INFINITY;
            continue;
        }
        long d = 0;
        vf a = {0};
        for (; d + V <= hd; d += V) a += load_f32(qf + d) * load_any(k, kv0 + s * hd + d, bf16);
        float dot = hsum(a);
        for (; d < hd; d++) dot += qf[d] * at(k, kv0 + s * hd + d, bf16);
        p[s] = dot * scale + bias;
        if (p[s] > mx) mx = p[s];
    }
    float sum = 0;
    for (long d = 0; d < hd; d++) acc[d] = 0;
    for (long s = 0; s < S; s++) {
        if (p[s] == -INFINITY) continue;
        float e = expf(p[s] - mx);
        sum += e;
        long d = 0;
        for (; d + V <= hd; d += V) {
            vf o = load_f32(acc + d) + e * load_any(v, kv0 + s * hd + d, bf16);
            memcpy(acc + d, &o, sizeof o);
        }
        for (; d < hd; d++) acc[d] += e * at(v, kv0 + s * hd + d, bf16);
    }
    long y0 = ((b * T + t) * H + h) * hd;
    for (long d = 0; d < hd; d++) {
        float o = acc[d] / sum;
        if (bf16)
            ((uint16_t *)y)[y0 + d] = f32_to_bf16(o);
        else
            ((float *)y)[y0 + d] = o;
    }
}

void few_rows_rmsnorm(const void *x, const void *w, void *y, long M, long D, float eps, int bf16) {
    for (long m = 0; m < M; m++) {
        float ss = 0;
        for (long d = 0; d < D; d++) {
            float v = bf16 ? bf16_to_f32(((const uint16_t *)x)[m * D + d]) : ((const float *)x)[m * D + d];
            ss += v * v;
        }
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (long d = 0; d < D; d++) {
            if (bf16) {
                float v = bf16_to_f32(((const uint16_t *)x)[m * D + d]);
                float n = round_bf16(v * r);
                ((uint16_t *)y)[m * D + d] = f32_to_bf16(bf16_to_f32(((const uint16_t *)w)[d]) * n);
            } else {
                ((float *)y)[m * D + d] = ((const float *)x)[m * D + d] * r * ((const float *)w)[d];
            }
        }
    }
}

/* Attention of a few query rows against a cache (decoding), in float32 as PyTorch's
 * scaled_dot_product_attention computes it on float32 copies of bfloat16 inputs: for batch row b,
 * head h and query t, with g = h / (H / KV) the key/value head it shares,
 *     y[b, t, h] = softmax_s(q[b, h, t] . k[b, g, s] * scale + mask[b, t, s]) @ v[b, g, s],
 * rounded once to the output dtype. q [B, H, T, hd] with element strides qb, qh, qt (hd contiguous),
 * k and v [B, KV, S, hd] contiguous, mask [B, T, S] additive (0 or -inf: masked keys are skipped),
 * y [B, T, H, hd] contiguous; all bfloat16 (bf16 = 1) or float32. The (b, h, t) rows are spread over
 * the threads. Returns 0, or -1 for bad arguments or a failed allocation (nothing written). */
int few_rows_attention(const void *q, long qb, long qh, long qt, const void *k, const void *v, const void *mask,
                       void *y, long B, long H, long KV, long T, long S, long hd, float scale, int bf16,
                       int threads) {
    if (B < 1 || T < 1 || S < 1 || hd < 1 || KV < 1 || H % KV != 0) return -1;
    long units = B * H * T;
    float *buf = malloc(sizeof(float) * (size_t)(S + 2 * hd) * (size_t)(threads > 0 ? threads : 1));
    if (!buf) return -1;
#pragma omp parallel num_threads(threads)
    {
        float *p = buf + (size_t)omp_get_thread_num() * (size_t)(S + 2 * hd), *qf = p + S, *acc = qf + hd;
#pragma omp for schedule(static)
        for (long u = 0; u < units; u++) {
            long b = u / (H * T), h = u / T % H, t = u % T;
            attend(q, b * qb + h * qh + t * qt, k, v, mask, y, b, h, t, H, KV, T, S, hd, scale, bf16, p, qf, acc);
        }
    }
    free(buf);
    return 0;
}

/* Rotary embedding of one head in place, Hugging Face's half-split layout: with c, s the head's cos
 * and sin rows and r = (-x[h:], x[:h]) (h = hd / 2), x = x * c + r * s, each product and the sum
 * rounded as PyTorch's ops round them (bfloat16: to bfloat16 each; float32: no fused multiply-add). */
__attribute__((optimize("fp-contract=off"))) static void rope_head(void *x, long x0, const void *c, const void *s,
                                                                    long c0, long hd, int bf16) {
    long h = hd / 2;
    for (long d = 0; d < h; d++) {
        float a = at(x, x0 + d, bf16), b = at(x, x0 + d + h, bf16);
        float ca = at(c, c0 + d, bf16), cb = at(c, c0 + d + h, bf16);
        float sa = at(s, c0 + d, bf16), sb = at(s, c0 + d + h, bf16);
        float t1 = a * ca, t2 = -b * sa, u1 = b * cb, u2 = a * sb;
        if (bf16) {
            t1 = round_bf16(t1), t2 = round_bf16(t2), u1 = round_bf16(u1), u2 = round_bf16(u2);
            ((uint16_t *)x)[x0 + d] = f32_to_bf16(t1 + t2);
            ((uint16_t *)x)[x0 + d + h] = f32_to_bf16(u1 + u2);
        } else {
            ((float *)x)[x0 + d] = t1 + t2;
            ((float *)x)[x0 + d + h] = u1 + u2;
        }
    }
}

/* The attention projections of M (1..MAXM) rows in one call: q = x @ wq.T [M, Oq], k = x @ wk.T and
 * v = x @ wv.T [M, Okv] (weights of type wtype; int8 with scales sq, sk, sv, else NULL), then the
 * rotary embedding of q and k per head of hd values with cos, sin [M, hd] (rounding as the plain
 * ops). x is prepared once for the three products; the threads split their outputs, then (after a
 * barrier) the heads. Returns 0, or -1 for bad arguments or a failed allocation (nothing written). */
int few_rows_qkv(const void *wq, const void *wk, const void *wv, const void *sq, const void *sk, const void *sv,
                 int wtype, const void *cos, const void *sin, long hd, void *q, void *k, void *v, const void *x,
                 long M, long Oq, long Okv, long D, int bf16, int threads) {
    if (M < 1 || M > MAXM || hd < 2 || hd % 2 || Oq % hd || Okv % hd || bad_types(wtype, sq, bf16) ||
        (sq == NULL) != (sk == NULL) || (sq == NULL) != (sv == NULL))
        return -1;
    Act ax;
    if (act_init(&ax, x, M, D, bf16, wtype) != 0) return -1;
    Out oq = {q, sq, Oq, bf16, NULL}, ok = {k, sk, Okv, bf16, NULL}, ov = {v, sv, Okv, bf16, NULL};
    long O = Oq + 2 * Okv, heads = (Oq + Okv) / hd;
#pragma omp parallel num_threads(threads)
    {
        long o0, o1;
        share(O, &o0, &o1);
        /* [o0, o1) of the outputs q | k | v, each part clipped to its matrix */
        if (o0 < Oq) product(wq, wtype, &ax, oq, M, D, o0, o1 < Oq ? o1 : Oq);
        if (o1 > Oq && o0 < Oq + Okv) {
            long a = o0 > Oq ? o0 - Oq : 0, b = o1 < Oq + Okv ? o1 - Oq : Okv;
            product(wk, wtype, &ax, ok, M, D, a, b);
        }
        if (o1 > Oq + Okv) product(wv, wtype, &ax, ov, M, D, o0 > Oq + Okv ? o0 - Oq - Okv : 0, o1 - Oq - Okv);
#pragma omp barrier
#pragma omp for schedule(static)
        for (long u = 0; u < M * heads; u++) {
            long m = u / heads, hh = u % heads;
            if (hh * hd < Oq)
                rope_head(q, m * Oq + hh * hd, cos, sin, m * hd, hd, bf16);
            else
                rope_head(k, m * Okv + hh * hd - Oq, cos, sin, m * hd, hd, bf16);
        }
    }
    free(ax.mem);
    return 0;
}

/* The attention half of a decoder layer for M = B * T (1..MAXM) rows, in one call:
 *     h = x + wo @ attention(rope(wq @ n), rope(wk @ n), wv @ n),  n = rmsnorm(x) * norm_w,
 * with rope's k and v written into the cache at slots[t] first (k_cache, v_cache [B, KV, S, hd]).
 * Each step rounds as the separate entries (few_rows_rmsnorm, few_rows_qkv, few_rows_attention,
 * few_rows) and the residual sum as PyTorch's add. Weights of type wtype (int8: scales, else NULL),
 * cos, sin [M, hd], mask [B, T, S] additive; x, h [M, D]. Returns 0, or -1 for bad arguments
 * (nothing written: neither h nor the cache) or a failed allocation. */
int few_rows_attention_block(const void *x, const void *norm_w, float eps, const void *wq, const void *wk,
                             const void *wv, const void *wo, const void *sq, const void *sk, const void *sv,
                             const void *so, int wtype, const void *cos, const void *sin, void *k_cache,
                             void *v_cache, const int64_t *slots, const void *mask, void *h, long B, long T, long D,
                             long H, long KV, long hd, long S, int bf16, int threads) {
    long M = B * T, Oq = H * hd, Okv = KV * hd;
    if (M < 1 || M > MAXM || hd < 2 || hd % 2 || KV < 1 || H % KV || S < 1 || bad_types(wtype, sq, bf16) ||
        (sq == NULL) != (sk == NULL) || (sq == NULL) != (sv == NULL) || (sq == NULL) != (so == NULL))
        return -1;
    for (long t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= S) return -1;
    size_t el = bf16 ? 2 : 4;
    int nt = threads > 0 ? threads : 1;
    char *n = malloc(el * M * D), *q = malloc(el * M * Oq), *k = malloc(el * M * Okv), *v = malloc(el * M * Okv);
    char *y = malloc(el * M * Oq);
    float *scratch = malloc(sizeof(float) * (size_t)(S + 2 * hd) * (size_t)nt);
    Act ax, ay;
    memset(&ax, 0, sizeof ax);
    memset(&ay, 0, sizeof ay);
    int failed = !n || !q || !k || !v || !y || !scratch;
    if (!failed) {
        few_rows_rmsnorm(x, norm_w, n, M, D, eps, bf16);
        failed = act_init(&ax, n, M, D, bf16, wtype) != 0;
    }
    if (!failed) {
        Out oq = {q, sq, Oq, bf16, NULL}, ok = {k, sk, Okv, bf16, NULL}, ov = {v, sv, Okv, bf16, NULL};
        Out oh = {h, so, D, bf16, x};
        long O = Oq + 2 * Okv, heads = H + 2 * KV;
#pragma omp parallel num_threads(nt)
        {
            long o0, o1;
            share(O, &o0, &o1);
            if (o0 < Oq) product(wq, wtype, &ax, oq, M, D, o0, o1 < Oq ? o1 : Oq);
            if (o1 > Oq && o0 < Oq + Okv)
                product(wk, wtype, &ax, ok, M, D, o0 > Oq ? o0 - Oq : 0, o1 < Oq + Okv ? o1 - Oq : Okv);
            if (o1 > Oq + Okv) product(wv, wtype, &ax, ov, M, D, o0 > Oq + Okv ? o0 - Oq - Okv : 0, o1 - Oq - Okv);
#pragma omp barrier
#pragma omp for schedule(static)
            for (long u = 0; u < M * heads; u++) { /* rope, then k and v into the cache */
                long m = u / heads, j = u % heads, b = m / T, t = m % T;
                if (j < H) {
                    rope_head(q, m * Oq + j * hd, cos, sin, m * hd, hd, bf16);
                    continue;
                }
                int is_k = j < H + KV;
                long g = is_k ? j - H : j - H - KV;
                char *src = (is_k ? k : v) + el * (m * Okv + g * hd);
                if (is_k) rope_head(k, m * Okv + g * hd, cos, sin, m * hd, hd, bf16);
                memcpy((char *)(is_k ? k_cache : v_cache) + el * (((b * KV + g) * S + slots[t]) * hd), src, el * hd);
            }
            float *p = scratch + (size_t)omp_get_thread_num() * (size_t)(S + 2 * hd);
#pragma omp for schedule(static)
            for (long u = 0; u < B * H * T; u++) {
                long b = u / (H * T), hh = u / T % H, t = u % T;
                attend(q, (b * T + t) * Oq + hh * hd, k_cache, v_cache, mask, y, b, hh, t, H, KV, T, S, hd,
                       (float)(1.0 / sqrt((double)hd)), bf16, p, p + S, p + S + hd);
            }
#pragma omp single
            failed = act_init(&ay, y, M, Oq, bf16, wtype) != 0;
            if (!failed) {
                long d0, d1;
                share(D, &d0, &d1);
                product(wo, wtype, &ay, oh, M, Oq, d0, d1);
            }
        }
    }
    free(ax.mem);
    free(ay.mem);
    free(n);
    free(q);
    free(k);
    free(v);
    free(y);
    free(scratch);
    return failed ? -1 : 0;
}

/* RMSNorm of M (1..MAXM) rows and the router's product in one call: n = rmsnorm(x) * norm_w (as
 * few_rows_rmsnorm), logits = n @ gate.T [M, E] (as few_rows). Returns 0, or -1 for bad arguments
 * or a failed allocation. */
int few_rows_norm_gate(const void *x, const void *norm_w, float eps, const void *gate, void *n, void *logits, long M,
                       long D, long E, int bf16, int threads) {
    if (M < 1 || M > MAXM) return -1;
    few_rows_rmsnorm(x, norm_w, n, M, D, eps, bf16);
    return few_rows(gate, bf16 ? W_BF16 : W_F32, NULL, n, logits, M, E, D, bf16, threads);
}
