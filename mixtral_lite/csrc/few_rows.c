/* Few-row matrix products on the CPU: y[m, o] = sum_k x[m, k] * w[o, k] for 1-8 rows of x.
 *
 * Decoding multiplies one row (or a few) of activations by every weight matrix, so it runs at the
 * speed the weights stream from memory. These loops read each weight once for all rows, convert
 * bfloat16 to float32 in registers (a 16-bit shift), and accumulate in float32: the same sums as
 * F.linear up to the order of the additions. Built by native.py with -O3 -march=native, so the
 * compiler vectorises the loops for the CPU at hand (AVX-512, AVX2, NEON); OpenMP spreads the
 * output rows over the threads PyTorch uses.
 *
 * Weights are bfloat16 (uint16_t bit patterns) or float32, [O, I], row-major (w[o, k] at o * I + k);
 * x [M, I] and y [M, O] are row-major in the weight's dtype.
 */
#include <omp.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define V 16     /* floats per vector */
#define MAXM 8   /* rows of x per call */

typedef float vf __attribute__((vector_size(V * 4)));
typedef uint32_t vu __attribute__((vector_size(V * 4)));
typedef uint16_t vh __attribute__((vector_size(V * 2)));

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

static inline float hsum(vf a) {
    float s = 0;
    for (int j = 0; j < V; j++) s += a[j];
    return s;
}

/* Row-major weights: each output is a dot product along a weight row; MM rows of x at once, two
 * accumulators per row so consecutive multiply-adds do not wait on each other. */
#define ROWS(T, SFX, MM)                                                                             \
    static void rows_##SFX##_##MM(const T *restrict w, const float *restrict x, float *restrict y, \
                                  long O, long I, long o0, long o1) {                              \
        for (long o = o0; o < o1; o++) {                                                             \
            const T *wr = w + o * I;                                                                 \
            vf a[MM], b[MM];                                                                         \
            for (int m = 0; m < MM; m++) a[m] = b[m] = (vf){0};                                      \
            long k = 0;                                                                              \
            for (; k + 2 * V <= I; k += 2 * V) {                                                     \
                vf w0 = load_##SFX(wr + k), w1 = load_##SFX(wr + k + V);                             \
                for (int m = 0; m < MM; m++) {                                                       \
                    a[m] += w0 * load_f32(x + m * I + k);                                            \
                    b[m] += w1 * load_f32(x + m * I + k + V);                                        \
                }                                                                                    \
            }                                                                                        \
            for (int m = 0; m < MM; m++) {                                                           \
                float s = hsum(a[m] + b[m]);                                                         \
                for (long kk = k; kk < I; kk++) s += scalar_##SFX(wr[kk]) * x[m * I + kk];          \
                y[m * O + o] = s;                                                                    \
            }                                                                                        \
        }                                                                                            \
    }

static inline float scalar_bf16(uint16_t h) { return bf16_to_f32(h); }
static inline float scalar_f32(float f) { return f; }

ROWS(uint16_t, bf16, 1)
ROWS(uint16_t, bf16, 2)
ROWS(uint16_t, bf16, 3)
ROWS(uint16_t, bf16, 4)
ROWS(float, f32, 1)
ROWS(float, f32, 2)
ROWS(float, f32, 3)
ROWS(float, f32, 4)

/* With AVX512-BF16 (-march=native on such a CPU), bfloat16 rows multiply pairs of bfloat16 values
 * straight into float32 sums (vdpbf16ps: 32 products per instruction, no conversion): twice the
 * arithmetic of the loop above, which several rows of x need. Same sums (the products of two
 * bfloat16 values are exact in float32), another order; subnormal inputs count as zero. */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define HAVE_DPBF16 1
#define DP(MM)                                                                                        \
    static void dp_##MM(const uint16_t *restrict w, const uint16_t *restrict x, float *restrict y,  \
                        long O, long I, long o0, long o1) {                                           \
        for (long o = o0; o < o1; o++) {                                                              \
            const uint16_t *wr = w + o * I;                                                           \
            __m512 a[MM], b[MM];                                                                      \
            for (int m = 0; m < MM; m++) a[m] = b[m] = _mm512_setzero_ps();                           \
            long k = 0;                                                                               \
            for (; k + 64 <= I; k += 64) {                                                            \
                __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k);                                  \
                __m512bh w1 = (__m512bh)_mm512_loadu_si512(wr + k + 32);                             \
                for (int m = 0; m < MM; m++) {                                                        \
                    a[m] = _mm512_dpbf16_ps(a[m], w0, (__m512bh)_mm512_loadu_si512(x + m * I + k));  \
                    b[m] = _mm512_dpbf16_ps(b[m], w1, (__m512bh)_mm512_loadu_si512(x + m * I + k + 32)); \
                }                                                                                     \
            }                                                                                         \
            for (; k + 32 <= I; k += 32) {                                                            \
                __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr + k);                                  \
                for (int m = 0; m < MM; m++)                                                          \
                    a[m] = _mm512_dpbf16_ps(a[m], w0, (__m512bh)_mm512_loadu_si512(x + m * I + k));  \
            }                                                                                         \
            for (int m = 0; m < MM; m++) {                                                            \
                float s = _mm512_reduce_add_ps(_mm512_add_ps(a[m], b[m]));                            \
                for (long kk = k; kk < I; kk++) s += bf16_to_f32(wr[kk]) * bf16_to_f32(x[m * I + kk]); \
                y[m * O + o] = s;                                                                     \
            }                                                                                         \
        }                                                                                             \
    }
DP(1)
DP(2)
DP(3)
DP(4)
DP(5)
DP(6)
DP(7)
DP(8)

static long run_dp(const uint16_t *w, const uint16_t *x, float *y, long M, long O, long I, long o0, long o1) {
    switch (M) {
    case 1: dp_1(w, x, y, O, I, o0, o1); return 1;
    case 2: dp_2(w, x, y, O, I, o0, o1); return 2;
    case 3: dp_3(w, x, y, O, I, o0, o1); return 3;
    case 4: dp_4(w, x, y, O, I, o0, o1); return 4;
    case 5: dp_5(w, x, y, O, I, o0, o1); return 5;
    case 6: dp_6(w, x, y, O, I, o0, o1); return 6;
    case 7: dp_7(w, x, y, O, I, o0, o1); return 7;
    default: dp_8(w, x, y, O, I, o0, o1); return 8;
    }
}
#else
#define HAVE_DPBF16 0
#endif

/* Up to 4 rows of x (all of M, or the first 4): returns how many were done. */
#define DISPATCH(T, SFX)                                                                              \
    static long run_##SFX(const T *w, const float *x, float *y, long M, long O, long I, long o0,      \
                          long o1) {                                                                   \
        switch (M) {                                                                                   \
        case 1: rows_##SFX##_1(w, x, y, O, I, o0, o1); return 1;                                      \
        case 2: rows_##SFX##_2(w, x, y, O, I, o0, o1); return 2;                                      \
        case 3: rows_##SFX##_3(w, x, y, O, I, o0, o1); return 3;                                      \
        default: rows_##SFX##_4(w, x, y, O, I, o0, o1); return 4;                                     \
        }                                                                                              \
    }

DISPATCH(uint16_t, bf16)
DISPATCH(float, f32)

/* int8 weights with one scale per output row (weight-only quantisation): y[m, o] = scale[o] *
 * sum_k x[m, k] * q[o, k]. The int8 values convert exactly to float32 in registers; the weight
 * streams at one byte per value, half of bfloat16's. */
typedef int8_t vq __attribute__((vector_size(V)));
typedef int32_t vi __attribute__((vector_size(V * 4)));

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

#define ROWS8(MM)                                                                                    \
    static void rows_i8_##MM(const int8_t *restrict w, const float *restrict x, float *restrict y,  \
                             long O, long I, long o0, long o1) {                                     \
        for (long o = o0; o < o1; o++) {                                                             \
            const int8_t *wr = w + o * I;                                                            \
            vf a[MM], b[MM];                                                                         \
            for (int m = 0; m < MM; m++) a[m] = b[m] = (vf){0};                                      \
            long k = 0;                                                                              \
            for (; k + 2 * V <= I; k += 2 * V) {                                                     \
                vf w0 = load_i8(wr + k), w1 = load_i8(wr + k + V);                                   \
                for (int m = 0; m < MM; m++) {                                                       \
                    a[m] += w0 * load_f32(x + m * I + k);                                            \
                    b[m] += w1 * load_f32(x + m * I + k + V);                                        \
                }                                                                                    \
            }                                                                                        \
            for (int m = 0; m < MM; m++) {                                                           \
                float s = hsum(a[m] + b[m]);                                                         \
                for (long kk = k; kk < I; kk++) s += (float)wr[kk] * x[m * I + kk];                  \
                y[m * O + o] = s;                                                                    \
            }                                                                                        \
        }                                                                                            \
    }
ROWS8(1)
ROWS8(2)
ROWS8(3)
ROWS8(4)
DISPATCH(int8_t, i8)

/* y = (x @ q.T) * scale for M (1..MAXM) rows of x; x, scale and y bfloat16 (bf16 = 1) or float32.
 * Returns 0, or -1 for an M out of range or a failed allocation (nothing written). */
int few_rows_int8(const int8_t *q, const void *scale, const void *x, void *y, long M, long O, long I, int bf16,
                  int threads) {
    if (M < 1 || M > MAXM) return -1;
    float *xf = malloc(sizeof(float) * M * I), *yf = malloc(sizeof(float) * M * O);
    if (!xf || !yf) {
        free(xf);
        free(yf);
        return -1;
    }
    for (long i = 0; i < M * I; i++) xf[i] = bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
#pragma omp parallel num_threads(threads)
    {
        long n = omp_get_num_threads(), t = omp_get_thread_num();
        long blocks = (O + V - 1) / V;
        long o0 = blocks * t / n * V, o1 = blocks * (t + 1) / n * V;
        if (o1 > O) o1 = O;
        for (long m = 0; o0 < o1 && m < M;) m += run_i8(q, xf + m * I, yf + m * O, M - m, O, I, o0, o1);
    }
    for (long m = 0; m < M; m++)
        for (long o = 0; o < O; o++) {
            float s = bf16 ? bf16_to_f32(((const uint16_t *)scale)[o]) : ((const float *)scale)[o];
            float v = yf[m * O + o] * s;
            if (bf16)
                ((uint16_t *)y)[m * O + o] = f32_to_bf16(v);
            else
                ((float *)y)[m * O + o] = v;
        }
    free(xf);
    free(yf);
    return 0;
}

/* Whether bfloat16 products use vdpbf16ps (1) or the float32 loop (0). */
int few_rows_dpbf16(void) { return HAVE_DPBF16; }

/* y = x @ w.T for M (1..MAXM) rows. bf16: 1 = bfloat16 x, w, y; 0 = float32. Returns 0, or -1 for
 * an M out of range or a failed allocation (nothing written). */
int few_rows_linear(const void *w, const void *x, void *y, long M, long O, long I, int bf16, int threads) {
    if (M < 1 || M > MAXM) return -1;
    int dp = bf16 && HAVE_DPBF16;
    float *xf = (float *)x, *yf = (float *)y;
    if (bf16) {
        xf = dp ? NULL : malloc(sizeof(float) * M * I);
        yf = malloc(sizeof(float) * M * O);
        if ((!dp && !xf) || !yf) {
            free(xf);
            free(yf);
            return -1;
        }
        if (!dp)
            for (long i = 0; i < M * I; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    }
    /* Split the outputs evenly, in multiples of V so no two threads share a cache line of y. */
#pragma omp parallel num_threads(threads)
    {
        long n = omp_get_num_threads(), t = omp_get_thread_num();
        long blocks = (O + V - 1) / V;
        long o0 = blocks * t / n * V, o1 = blocks * (t + 1) / n * V;
        if (o1 > O) o1 = O;
        for (long m = 0; o0 < o1 && m < M;) {
#if HAVE_DPBF16
            if (dp) {
                m += run_dp((const uint16_t *)w, (const uint16_t *)x + m * I, yf + m * O, M - m, O, I, o0, o1);
                continue;
            }
#endif
            if (bf16)
                m += run_bf16((const uint16_t *)w, xf + m * I, yf + m * O, M - m, O, I, o0, o1);
            else
                m += run_f32((const float *)w, xf + m * I, yf + m * O, M - m, O, I, o0, o1);
        }
    }
    if (bf16) {
        for (long i = 0; i < M * O; i++) ((uint16_t *)y)[i] = f32_to_bf16(yf[i]);
        free(xf);
        free(yf);
    }
    return 0;
}
