/* The kernel's shared core (included by every .c file here: products.c, decode.c, layer.c,
 * attention.c, int4.c): bfloat16/int8 helpers, the few-row product loops for every weight type and
 * CPU (generic vectors, AVX-512 BF16 pairs, AVX512-VNNI int16 pairs, int4 codes against int8
 * activations), the activations prepared for them (Act), the per-thread product and a vectorised exp. Everything here is static; the exported
 * entries live in the .c files. */
#ifndef MIXTRAL_LITE_KERNEL_H
#define MIXTRAL_LITE_KERNEL_H
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
#define LAYER_MAXM 64 /* rows of a decode step through the one-call layer and its parts (B rows of one token) */

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

/* The sum of a's 16 lanes in sum16's order (elements two apart, then neighbours, then 128-bit
 * lanes): a one-row path that reduces one vector gives the bits of a path that reduces sixteen. */
static inline float tree16(vf a) {
    float q[4];
    for (int l = 0; l < 4; l++) q[l] = (a[4 * l] + a[4 * l + 2]) + (a[4 * l + 1] + a[4 * l + 3]);
    return (q[0] + q[1]) + (q[2] + q[3]);
}

/* x[0..n) as float32 from bfloat16 (bf16 = 1) or float32. */
static inline float at(const void *x, long i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

static inline vf load_any(const void *x, long i, int bf16) {
    return bf16 ? load_bf16((const uint16_t *)x + i) : load_f32((const float *)x + i);
}

/* Where results go: y[m, o] = sum * scale[o] (no scale: sum), stored as bfloat16 or float32. For
 * int4 weights scale and offset are the weights' float16 group scales and offsets [O, I / G]
 * (product4 applies them inside the sums; store sees no scale). */
typedef struct {
    void *y;
    const void *scale;
    long O;
    int bf16;
    const void *res;    /* a residual [M, O] to add (after the product's own rounding), or NULL */
    const void *offset; /* int4 only */
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

/* f32_to_bf16 lane by lane (round to nearest even, NaN stays NaN): the same bits as the scalar. */
static inline vu bf16_bits(vf f) {
    vu u;
    memcpy(&u, &f, sizeof u);
    vu nan = (u & 0x7fffffffu) > 0x7f800000u;
    vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (nan & ((u >> 16) | 0x40u)) | (~nan & r);
}

/* store() for the 16 outputs o .. o+15 of row m at once, the same operations lane by lane (so the
 * same bits): the per-output epilogue of a one-row product costs as much as a 512-byte int8 row. */
static inline void store16(Out out, long m, long o, vf s) {
    if (out.scale) s *= out.bf16 ? load_bf16((const uint16_t *)out.scale + o) : load_f32((const float *)out.scale + o);
    if (out.res) {
        if (out.bf16) {
            vu b = bf16_bits(s) << 16;
            vf r;
            memcpy(&r, &b, sizeof r);
            s = load_bf16((const uint16_t *)out.res + m * out.O + o) + r;
        } else {
            s = load_f32((const float *)out.res + m * out.O + o) + s;
        }
    }
    if (out.bf16) {
        vh h = __builtin_convertvector(bf16_bits(s), vh);
        memcpy((uint16_t *)out.y + m * out.O + o, &h, sizeof h);
    } else {
        memcpy((float *)out.y + m * out.O + o, &s, sizeof s);
    }
}

/* Bytes of a weight row fetched ahead of the loads by the streaming loops (ROWS, and the one-row
 * bfloat16 loop): the hardware prefetchers alone leave part of the read bandwidth unused
 * (docs/performance.md has the A/B). */
#define AHEAD 1024

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
                if ((k * sizeof(T)) % 128 == 0) /* one line in two: the other comes with it */      \
                    __builtin_prefetch((const char *)(wr + k) + AHEAD, 0, 3);                        \
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

/* Lane r of the result: the sum of a[r]'s 16 lanes (r < 16), in one fixed order (elements two
 * apart, then neighbours, then 128-bit lanes): 16 sums for the price of about two reductions. Every
 * path below sums each (weight row, activation row) pair this way, whatever else shares the call,
 * so a row's result never depends on the other rows of its batch. */
static inline __m512 sum16(const __m512 *a) {
    __m512 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int j = 0; j < 4; j++) {
        __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(b[2 * j]), _mm512_castps_pd(b[2 * j + 1]));
        __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(b[2 * j]), _mm512_castps_pd(b[2 * j + 1]));
        c[j] = _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
    }
    for (int j = 0; j < 2; j++)
        d[j] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

/* The lane sums of weight row r against activation row m over the first i32 inputs (a multiple of
 * 32), one vdpbf16ps per 32 inputs, in two accumulators (even and odd blocks of 32: two chains of
 * additions in flight), added into acc[r * MM + m]. MO weight rows and MM activation rows (at most
 * 8 pairs) stay in registers, so each load feeds several products. */
#define DP_AHEAD 4096 /* bytes of a weight row fetched ahead of the loads (several activation rows) */
#define DPB(MO, MM)                                                                                  \
    static inline void dpb_##MO##_##MM(const uint16_t *restrict w, const uint16_t *restrict x, long I, \
                                       long i32, __m512 *acc) {                                      \
        __m512 a[MO * MM], b[MO * MM];                                                               \
        for (int p = 0; p < MO * MM; p++) a[p] = b[p] = _mm512_setzero_ps();                         \
        long k = 0;                                                                                  \
        for (; k + 64 <= i32; k += 64) {                                                             \
            __m512bh x0[MM], x1[MM];                                                                 \
            for (int m = 0; m < MM; m++) {                                                           \
                x0[m] = (__m512bh)_mm512_loadu_si512(x + m * I + k);                                 \
                x1[m] = (__m512bh)_mm512_loadu_si512(x + m * I + k + 32);                            \
            }                                                                                        \
            for (int r = 0; r < MO; r++) {                                                           \
                if (MM > 1) { /* compute between loads: the hardware prefetcher falls behind */     \
                    _mm_prefetch((const char *)(w + r * I + k) + DP_AHEAD, _MM_HINT_T0);             \
                    _mm_prefetch((const char *)(w + r * I + k) + DP_AHEAD + 64, _MM_HINT_T0);        \
                } else { /* one line in two, as the float32 loop */                                 \
                    _mm_prefetch((const char *)(w + r * I + k) + AHEAD, _MM_HINT_T0);                \
                }                                                                                    \
                __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + r * I + k);                           \
                __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + r * I + k + 32);                      \
                for (int m = 0; m < MM; m++) {                                                       \
                    a[r * MM + m] = _mm512_dpbf16_ps(a[r * MM + m], w0, x0[m]);                      \
                    b[r * MM + m] = _mm512_dpbf16_ps(b[r * MM + m], w1, x1[m]);                      \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        if (k < i32)                                                                                 \
            for (int r = 0; r < MO; r++) {                                                           \
                __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + r * I + k);                           \
                for (int m = 0; m < MM; m++)                                                         \
                    a[r * MM + m] = _mm512_dpbf16_ps(a[r * MM + m], w0,                              \
                                                     (__m512bh)_mm512_loadu_si512(x + m * I + k));   \
            }                                                                                        \
        for (int p = 0; p < MO * MM; p++) acc[p] = _mm512_add_ps(a[p], b[p]);                        \
    }
DPB(1, 1) DPB(1, 2) DPB(1, 3) DPB(1, 4)
DPB(2, 1) DPB(2, 2) DPB(2, 3) DPB(2, 4)
DPB(3, 1) DPB(3, 2) DPB(4, 1) DPB(4, 2)

static inline void dpb(long mo, long mm, const uint16_t *w, const uint16_t *x, long I, long i32, __m512 *acc) {
#define DPB_CASE(MO, MM) \
    case MO * 8 + MM: dpb_##MO##_##MM(w, x, I, i32, acc); break;
    switch (mo * 8 + mm) {
        DPB_CASE(1, 1) DPB_CASE(1, 2) DPB_CASE(1, 3) DPB_CASE(1, 4)
        DPB_CASE(2, 1) DPB_CASE(2, 2) DPB_CASE(2, 3) DPB_CASE(2, 4)
        DPB_CASE(3, 1) DPB_CASE(3, 2) DPB_CASE(4, 1) DPB_CASE(4, 2)
    }
#undef DPB_CASE
}

/* The inputs past the last multiple of 32, added after the vector sums. */
static inline float dp_tail(const uint16_t *wr, const uint16_t *xm, long i32, long I) {
    float s = 0;
    for (long k = i32; k < I; k++) s += bf16_to_f32(wr[k]) * bf16_to_f32(xm[k]);
    return s;
}

static void run_dp(const uint16_t *w, const uint16_t *x, Out out, long M, long I, long o0, long o1) {
    long i32 = I / 32 * 32;
    __m512 acc[16];
    vf s;
    if (M == 1) { /* 16 outputs, one weight row after the other (one stream), one vector epilogue */
        for (long o = o0; o < o1; o += V) {
            long n = o1 - o < V ? o1 - o : V;
            for (long r = 0; r < V; r++) acc[r] = _mm512_setzero_ps();
            for (long r = 0; r < n; r++) dpb_1_1(w + (o + r) * I, x, I, i32, acc + r);
            __m512 t = sum16(acc);
            memcpy(&s, &t, sizeof s);
            if (i32 < I)
                for (long j = 0; j < n; j++) s[j] += dp_tail(w + (o + j) * I, x, i32, I);
            if (n == V)
                store16(out, 0, o, s);
            else
                for (long j = 0; j < n; j++) store(out, 0, o + j, s[j]);
        }
        return;
    }
    /* Blocks of mo weight rows by mm activation rows. One weight row at a time streams best; two
     * share each activation load, which pays once the activations no longer fit the L1 cache. */
    long mm = M < 4 ? M : 4, mo = M > 4 && I > 1024 ? 2 : 1;
    for (long o = o0; o < o1; o += mo) {
        long no = o1 - o < mo ? o1 - o : mo;
        for (long m = 0; m < M; m += mm) {
            long nm = M - m < mm ? M - m : mm;
            for (int p = 0; p < 16; p++) acc[p] = _mm512_setzero_ps();
            dpb(no, nm, w + o * I, x + m * I, I, i32, acc);
            __m512 t = sum16(acc);
            memcpy(&s, &t, sizeof s);
            for (long r = 0; r < no; r++)
                for (long j = 0; j < nm; j++) {
                    float v = s[r * nm + j];
                    if (i32 < I) v += dp_tail(w + (o + r) * I, x + (m + j) * I, i32, I);
                    store(out, m + j, o + r, v);
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
#define Q8_AHEAD 2048 /* bytes of an int8 weight row fetched ahead of the loads (qd_row) */
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
QD(2)
QD(3)

/* The raw sum of one weight row against one int16 row (before the epilogue, store). */
static inline float qd_row(const int8_t *restrict wr, const int16_t *restrict xm, long I) {
    __m512 f = _mm512_setzero_ps();
    long i32 = I / 32 * 32, k = 0;
    while (k < i32) {
        long end = k + CHUNK < i32 ? k + CHUNK : i32;
        __m512i a = _mm512_setzero_si512(), b = a;
        for (; k + 64 <= end; k += 64) {
            _mm_prefetch((const char *)(wr + k) + Q8_AHEAD, _MM_HINT_T0); /* every line: one in two gains nothing */
            a = _mm512_dpwssd_epi32(a, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wr + k))),
                                    _mm512_loadu_si512(xm + k));
            b = _mm512_dpwssd_epi32(b, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wr + k + 32))),
                                    _mm512_loadu_si512(xm + k + 32));
        }
        for (; k + 32 <= end; k += 32)
            a = _mm512_dpwssd_epi32(a, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wr + k))),
                                    _mm512_loadu_si512(xm + k));
        f = _mm512_add_ps(f, _mm512_add_ps(_mm512_cvtepi32_ps(a), _mm512_cvtepi32_ps(b)));
    }
    float s = _mm512_reduce_add_ps(f);
    for (long kk = i32; kk < I; kk++) s += (float)(wr[kk] * xm[kk]);
    return s;
}

static void run_qd(const int8_t *w, const int16_t *xq, const float *xs, Out out, long M, long I, long o0, long o1) {
    if (M == 1) { /* one row: sums of 16 outputs, then one vector epilogue */
        long o = o0;
        for (; o + V <= o1; o += V) {
            vf sums;
            for (int r = 0; r < V; r++) sums[r] = qd_row(w + (o + r) * I, xq, I);
            store16(out, 0, o, sums * xs[0]);
        }
        for (; o < o1; o++) store(out, 0, o, qd_row(w + o * I, xq, I) * xs[0]);
        return;
    }
    for (long o = o0; o < o1; o++) {
        const int8_t *wr = w + o * I;
        for (long m = 0; m < M;) {
            switch (M - m) {
            case 1: store(out, m, o, qd_row(wr, xq + m * I, I) * xs[m]); m += 1; break;
            case 2: qd_2(wr, xq, xs, out, m, I, o); m += 2; break;
            default: qd_3(wr, xq, xs, out, m, I, o); m += 3; break;
            }
        }
    }
}
#else
#define HAVE_VNNI 0
#endif


enum { W_F32 = 0, W_BF16 = 1, W_INT8 = 2, W_INT4 = 3 };

/* Group-wise int4 weights (model/quant4.py's format), [O, I]: codes packed two to a byte in blocks
 * of 32 inputs (byte j of a block: input j in the low nibble, input j + 16 in the high one), a
 * float16 scale s and offset b per group of G inputs: w = q * s + b. So per row and group
 *     sum_k x_k w_k = s * sum_k x_k q_k + b * sum_k x_k,
 * and the group sums of x are computed once per activation row.
 *
 * With AVX2 the activations are rounded to int8, one scale per group (xs = max|x| / 127, an error
 * of at most xs / 2 per element, as llama.cpp's Q8 activations; the group sums are those of the
 * rounded values, so the result is the exact product with rounded activations), and a block of 32
 * weights costs a broadcast load, a shift, a blend and a mask to unpack the codes into a register,
 * then one vpmaddubsw per activation row (unsigned codes times signed activations, pairs summed in
 * 16 bits: at most 2 * 15 * 127 per lane, so eight blocks add up in 16 bits before one vpmaddwd
 * widens them). Without AVX2 (or for rows holding inf or NaN) a scalar float32 loop dequantises
 * each weight. Sums are float32; the output is rounded once to the activations' dtype. */
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

#if defined(__AVX2__) && defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HAVE_VNNI4 1
#else
#define HAVE_VNNI4 0
#endif

/* The int8 activations of one row for int4 products with AVX512-VNNI: in chunks of 128 inputs
 * (four blocks), the first halves of the four blocks, then their second halves, so that the low
 * and the high nibbles of 64 bytes of codes each meet their activations as they lie; the last chunk
 * padded with zeros. Elsewhere the inputs in order. */
static inline long q8_stride(long I) { return HAVE_VNNI4 ? (I + 127) / 128 * 128 : I; }

/* The activations in the form the loop for a weight type reads: bfloat16 as given (vdpbf16ps),
 * int16 with one scale per row (vpdpwssd), int8 with one scale per group of G (int4 weights), or
 * float32 (the generic loops; bfloat16 rows are converted once, they are few). */
typedef struct {
    const uint16_t *bf;
    const int16_t *q;
    const float *qs;
    const float *f;
    const int8_t *q8;    /* int4 weights: int8 rows [M, q8_stride(I)] (AVX2), or NULL (the float loop) */
    const float *gs;     /* [M, I / G] the int8 scale of each group */
    const float *gsum;   /* [M, I / G] the sum of each group (of the int8 values, scaled, with AVX2) */
    const int32_t *gidx; /* AVX512-VNNI: per chunk of a run of 16 groups, each int32 lane's group */
    long G;              /* int4 weights: inputs per group */
    void *mem;           /* what act_init allocated */
} Act;

/* M rows of x prepared for int4 products of I inputs in groups of G. */
static int act4_init(Act *a, const void *x, long M, long I, long G, int bf16) {
    long ng = I / G, stride = q8_stride(I), chunks = 4 * (G / 32); /* chunks in a run of 16 groups */
    memset(a, 0, sizeof *a);
    a->G = G;
    size_t fbytes = bf16 ? sizeof(float) * M * I : 0, gbytes = sizeof(float) * 2 * M * ng;
    size_t ibytes = HAVE_VNNI4 ? sizeof(int32_t) * 16 * chunks : 0;
    char *mem = malloc(fbytes + gbytes + ibytes + (size_t)M * stride);
    if (!mem) return -1;
    a->mem = mem;
    float *f = bf16 ? (float *)mem : (float *)x;
    float *gs = (float *)(mem + fbytes), *gsum = gs + M * ng;
    int32_t *gidx = (int32_t *)(mem + fbytes + gbytes);
    int8_t *q = (int8_t *)(mem + fbytes + gbytes + ibytes);
    a->gs = gs, a->gsum = gsum;
    if (HAVE_VNNI4)
        for (long c = 0; c < chunks; c++) /* int32 lane j of chunk c: block 4c + j / 4 */
            for (int j = 0; j < 16; j++) gidx[c * 16 + j] = (int32_t)((4 * c + j / 4) / (G / 32));
    a->gidx = gidx;
    if (bf16)
        for (long i = 0; i < M * I; i++) f[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    a->f = f;
    memset(q, 0, (size_t)M * stride);
    int finite = 1;
    for (long m = 0; m < M; m++)
        for (long g = 0; g < ng; g++) {
            const float *xg = f + m * I + g * G;
            float amax = 0, s = 0;
            for (long k = 0; k < G; k++) {
                s += xg[k];
                if (!(fabsf(xg[k]) <= amax)) amax = fabsf(xg[k]); /* NaN makes amax NaN */
            }
            gsum[m * ng + g] = s;
            if (!isfinite(amax)) finite = 0;
            float inv = amax > 0 ? 127.0f / amax : 0.0f;
            gs[m * ng + g] = amax / 127.0f;
            int qsum = 0;
            for (long k = 0; finite && k < G; k++) {
                long i = g * G + k, at = i;
                if (HAVE_VNNI4) { /* chunk, block in it, half, position */
                    long c = i / 128, b = i % 128 / 32, h = i % 32 / 16;
                    at = c * 128 + h * 64 + b * 16 + i % 16;
                }
                int8_t v = (int8_t)nearbyintf(xg[k] * inv);
                q[m * stride + at] = v;
                qsum += v;
            }
            /* the offsets multiply the rounded activations too: the error is then sum dx * w, not
             * sum dx * (w - b) (the codes' part alone is far from zero-mean) */
            if (finite) gsum[m * ng + g] = (float)qsum * gs[m * ng + g];
        }
#if defined(__AVX2__)
    if (finite) a->q8 = q;
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
                                 const uint16_t *restrict br, const Act *a, long m0, long I, long G, \
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
                            _mm256_loadu_si256((const __m256i *)(a->q8 + (m0 + m) * I + k))));         \
                }                                                                                    \
                for (int m = 0; m < MM; m++) acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(h[m], ones)); \
            }                                                                                        \
            for (int m = 0; m < MM; m++) {                                                           \
                long j = (m0 + m) * ng + g;                                                          \
                f[m] = FMADD(_mm256_cvtepi32_ps(acc[m]), _mm256_set1_ps(s * a->gs[j]), f[m]); \
                bsum[m] += b * a->gsum[j];                                                            \
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

/* With AVX512-VNNI: 128 codes (four blocks) per 64-byte load, the low nibbles and the high ones each
 * a register after one mask (and one shift), against the activations laid out for them
 * (q8_stride), and vpdpbusd multiplies unsigned codes by signed activations and adds groups of four
 * straight into int32 lanes (at most 2 * 4 * 15 * 127 per lane). Each 128-bit lane then holds one
 * block's sum: converted to float32, times its group's s * xs, picked from the 16 groups of a run
 * with one vpermps, into float32 lanes; the offsets' part sum b * gsum is 16 groups at a time too.
 * One horizontal sum per row. */
#if HAVE_VNNI4
/* n (1..16) float16 values from p as float32, zeros after them; plain loads where they fit (masked
 * loads of weights that miss the cache measured twice as slow). */
static inline __m512 load_halves(const uint16_t *p, long n) {
    if (n >= 16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    if (n == 8) return _mm512_cvtph_ps(_mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)p)));
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1), p));
}

/* Rows ahead that dotv_rows4 prefetches its codes from: weights streamed from memory read at about
 * 1.8x the speed without (measured with 32 rows ahead; 8 rows: 1.1x). */
#define PF4 32
#define DOTV(MM)                                                                                     \
    static inline void dotv_##MM(const uint8_t *restrict wr, const uint16_t *restrict sr,           \
                                 const uint16_t *restrict br, const Act *a, long m0, long I, long G, \
                                 float *restrict out) {                                              \
        long ng = I / G, stride = q8_stride(I);                                                      \
        __m512 f[MM];                                                                                \
        for (int m = 0; m < MM; m++) f[m] = _mm512_setzero_ps();                                     \
        const __m512i low = _mm512_set1_epi8(0x0f);                                                  \
        for (long g0 = 0; g0 < ng; g0 += 16) { /* a run of 16 groups (fewer at the end) */          \
            __mmask16 gm = ng - g0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (ng - g0)) - 1);   \
            __m512 s = load_halves(sr + g0, ng - g0), b = load_halves(br + g0, ng - g0);             \
            __m512 mg[MM];                                                                           \
            for (int m = 0; m < MM; m++) {                                                           \
                const float *gs = a->gs + (m0 + m) * ng + g0, *gsum = a->gsum + (m0 + m) * ng + g0;  \
                mg[m] = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(gm, gs));                             \
                f[m] = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(gm, gsum), f[m]);                    \
            }                                                                                        \
            long k1 = (g0 + 16) * G < I ? (g0 + 16) * G : I;                                         \
            const int32_t *idx = a->gidx;                                                            \
            for (long k = g0 * G; k < k1; k += 128, idx += 16) {                                     \
                _mm_prefetch((const char *)(wr + k / 2 + PF4 * (I / 2)), _MM_HINT_T0);               \
                __m512i p = k + 128 <= I ? _mm512_loadu_si512((const void *)(wr + k / 2))             \
                                         : _mm512_maskz_loadu_epi8((1ull << ((I - k) / 2)) - 1, wr + k / 2); \
                __m512i lo = _mm512_and_si512(p, low), hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), low); \
                __m512i ix = _mm512_loadu_si512((const void *)idx);                                  \
                for (int m = 0; m < MM; m++) {                                                       \
                    const int8_t *xq = a->q8 + (m0 + m) * stride + k;                                \
                    __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)xq)); \
                    acc = _mm512_dpbusd_epi32(acc, hi, _mm512_loadu_si512((const void *)(xq + 64)));  \
                    f[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_permutexvar_ps(ix, mg[m]), f[m]); \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
        for (int m = 0; m < MM; m++) { /* dotv_rows4's order of operations: the same bits as one row */ \
            vf v;                                                                                    \
            memcpy(&v, &f[m], sizeof v);                                                             \
            out[m] = tree16(v);                                                                      \
        }                                                                                            \
    }
DOTV(1)
DOTV(2)
DOTV(3)
DOTV(4)

/* One activation row against four weight rows (w: the first, each I / 2 bytes on), the activations'
 * loads shared; returned partly summed: 128-bit lane q holds at position r lane q's share of weight
 * row r's sum (rows4_sum16 finishes four of these into 16 sums). */
static inline __m512 dotv_rows4(const uint8_t *restrict w, const uint16_t *restrict sr, const uint16_t *restrict br,
                                const Act *a, long I, long G) {
    long ng = I / G, half = I / 2;
    __m512 f[4];
    for (int r = 0; r < 4; r++) f[r] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0f);
    const int8_t *xq = a->q8;
    for (long g0 = 0; g0 < ng; g0 += 16) {
        __mmask16 gm = ng - g0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (ng - g0)) - 1);
        __m512 xs = _mm512_maskz_loadu_ps(gm, a->gs + g0), xsum = _mm512_maskz_loadu_ps(gm, a->gsum + g0);
        __m512 mg[4];
        for (int r = 0; r < 4; r++) {
            __m512 s = load_halves(sr + r * ng + g0, ng - g0), b = load_halves(br + r * ng + g0, ng - g0);
            mg[r] = _mm512_mul_ps(s, xs);
            f[r] = _mm512_fmadd_ps(b, xsum, f[r]);
        }
        long k1 = (g0 + 16) * G < I ? (g0 + 16) * G : I;
        const int32_t *idx = a->gidx;
        for (long k = g0 * G; k < k1; k += 128, idx += 16) {
            __m512i xl = _mm512_loadu_si512((const void *)(xq + k)), xh = _mm512_loadu_si512((const void *)(xq + k + 64));
            __m512i ix = _mm512_loadu_si512((const void *)idx);
            int full = k + 128 <= I;
            __mmask64 cm = full ? ~0ull : (1ull << ((I - k) / 2)) - 1;
            const uint8_t *wk = w + k / 2;
            for (int r = 0; r < 4; r++) {
                _mm_prefetch((const char *)(wk + (r + PF4) * half), _MM_HINT_T0);
                __m512i p = full ? _mm512_loadu_si512((const void *)(wk + r * half))
                                 : _mm512_maskz_loadu_epi8(cm, wk + r * half);
                __m512i lo = _mm512_and_si512(p, low), hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), low);
                __m512i acc = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
                f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_permutexvar_ps(ix, mg[r]), f[r]);
            }
        }
    }
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(f[0], f[1]), _mm512_unpackhi_ps(f[0], f[1]));
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(f[2], f[3]), _mm512_unpackhi_ps(f[2], f[3]));
    __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)), _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
}

/* The 16 sums of four dotv_rows4 results (rows 4i .. 4i + 3 in p[i]), in order. */
static inline vf rows4_sum16(const __m512 p[4]) {
    __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(p[0], p[1], 0x88), _mm512_shuffle_f32x4(p[0], p[1], 0xdd));
    __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(p[2], p[3], 0x88), _mm512_shuffle_f32x4(p[2], p[3], 0xdd));
    __m512 r = _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88), _mm512_shuffle_f32x4(u01, u23, 0xdd));
    vf v;
    memcpy(&v, &r, sizeof v);
    return v;
}
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
static void product4(const uint8_t *w, const uint16_t *s, const uint16_t *b, const Act *a, Out out, long M, long I,
                     long o0, long o1) {
    long G = a->G, ng = I / G;
#if HAVE_VNNI4
    if (a->q8 && M == 1) { /* one row: sums of 16 outputs, then one vector epilogue (store16) */
        long o = o0;
        for (; o + V <= o1; o += V) {
            __m512 p[4];
            for (int i = 0; i < 4; i++) {
                long r = o + 4 * i;
                p[i] = dotv_rows4(w + r * (I / 2), s + r * ng, b + r * ng, a, I, G);
            }
            store16(out, 0, o, rows4_sum16(p));
        }
        o0 = o;
    }
#endif
    for (long o = o0; o < o1; o++) {
        const uint8_t *wr = w + o * (I / 2);
        const uint16_t *sr = s + o * ng, *br = b + o * ng;
        if (a->q8) {
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

/* Prepares x [M, I] (bfloat16 if bf16, else float32) for products with wtype weights (int4: in
 * groups of G inputs, else G is ignored); 0, or -1 for a failed allocation. Free a->mem afterwards. */
static int act_init(Act *a, const void *x, long M, long I, int bf16, int wtype, long G) {
    if (wtype == W_INT4) return act4_init(a, x, M, I, G, bf16);
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

/* Whether act_init for these activations and weights only records x's address (no copy, no
 * conversion, nothing allocated): then it may run before x is written. */
static inline int act_view(int bf16, int wtype) {
    if (wtype == W_INT4) return 0;
    if (HAVE_DPBF16 && wtype == W_BF16) return 1;
    if (HAVE_VNNI && wtype == W_INT8) return 0;
    return !bf16;
}

/* Outputs [o0, o1) of x @ w.T for the M rows of x (one thread's share). */
static void product(const void *w, int wtype, const Act *x, Out out, long M, long I, long o0, long o1) {
    if (o0 >= o1) return;
    if (wtype == W_INT4) {
        Out o = out;
        o.scale = NULL; /* the group scales act inside the sums */
        product4((const uint8_t *)w, (const uint16_t *)out.scale, (const uint16_t *)out.offset, x, o, M, I, o0, o1);
        return;
    }
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
    return (wtype == W_INT8 || wtype == W_INT4) != (scale != NULL) || (wtype == W_BF16 && !bf16) ||
           (wtype == W_F32 && bf16) || wtype < W_F32 || wtype > W_INT4;
}

/* Whether int4 weights of I inputs lack their offsets or groups of G (a multiple of 32 dividing I),
 * or other weights come with offsets. */
static int bad_groups(int wtype, const void *offset, long G, long I) {
    if (wtype != W_INT4) return offset != NULL;
    return offset == NULL || G < 32 || G % 32 || I % G;
}

static inline float silu(float v) { return v / (1.0f + expf(-v)); }

static inline float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

static inline vf splat(float s) { return (vf){0} + s; }

static inline vf select_f(vi m, vf a, vf b) { /* m ? a : b, lane by lane (m: all ones or zero) */
    vu r = ((vu)m & (vu)a) | (~(vu)m & (vu)b);
    return (vf)r;
}

/* exp(x) lane by lane, Cephes' single-precision polynomial (about 1 ulp); exactly 0 below
 * log(FLT_MIN) (masked scores: -inf), NaN stays NaN. */
static inline vf vexp(vf x) {
    const float hi = 88.3762626647949f, lo = -87.3365447505531f;
    vf xc = select_f(x > splat(hi), splat(hi), x);
    xc = select_f(xc < splat(lo), splat(lo), xc);
    vf t = xc * splat(1.44269504088896341f) + splat(0.5f);
    vi n = __builtin_convertvector(t, vi);                    /* truncation ... */
    n += __builtin_convertvector(n, vf) > t;                 /* ... to floor (true: -1) */
    vf fn = __builtin_convertvector(n, vf);
    vf r = xc - fn * splat(0.693359375f) - fn * splat(-2.12194440e-4f);
    vf y = splat(1.9875691500e-4f);
    y = y * r + splat(1.3981999507e-3f);
    y = y * r + splat(8.3334519073e-3f);
    y = y * r + splat(4.1665795894e-2f);
    y = y * r + splat(1.6666665459e-1f);
    y = y * r + splat(5.0000001201e-1f);
    y = y * r * r + r + splat(1.0f);
    vi bits = (n + 127) << 23;
    vf e = y * (vf)bits;
    e = select_f(x < splat(lo), splat(0.0f), e);
    return select_f(x != x, x, e);
}


/* Exported entries the other files call. */
int few_rows(const void *w, int wtype, const void *scale, const void *x, void *y, long M, long O, long I, int bf16,
             int threads);
void few_rows_rmsnorm(const void *x, const void *w, void *y, long M, long D, float eps, int bf16);
int few_rows_experts(const void *w1, const void *w3, const void *w2, const void *s1, const void *s3, const void *s2,
                     const void *b1, const void *b3, const void *b2, int wtype, long G, long E, const int64_t *idx,
                     const float *rw, long K, const void *res, const void *x, void *y, long M, long D, long I, int bf16,
                     int threads);
int few_rows_attention_block(const void *x, const void *norm_w, float eps, const void *wq, const void *wk,
                             const void *wv, const void *wo, const void *sq, const void *sk, const void *sv,
                             const void *so, const void *bq, const void *bk, const void *bv, const void *bo,
                             int wtype, long G, const void *cos, const void *sin, void *k_cache, void *v_cache,
                             const int64_t *slots, const void *mask, void *h, long B, long T, long D, long H, long KV,
                             long hd, long S, int bf16, int threads);
int few_rows_norm_gate(const void *x, const void *norm_w, float eps, const void *gate, void *n, void *logits, long M,
                       long D, long E, int bf16, int threads);

#endif
