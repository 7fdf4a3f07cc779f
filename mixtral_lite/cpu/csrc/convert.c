/* Quantised weights converted for many-row products (prefill): PyTorch's GEMM multiplies the result.
 * int8 codes become bfloat16 or float32 exactly (|q| <= 128 fits bfloat16's 8 significant bits);
 * int4 codes become q * s + b per group in float32, then bfloat16 (nearest even), as
 * quant4.dequantize4(...).to(dtype) computes it: q * s is exact in float32 (a 4-bit code times an
 * 11-bit float16 significand), so a fused multiply-add rounds as PyTorch's two ops do. The
 * plain conversions run several elementwise passes over float32 temporaries; these run one. */
#include "kernel.h"

typedef uint8_t vb __attribute__((vector_size(V)));

static inline void put16(void *out, long i, vf v, int bf16) {
    if (bf16) {
        vh h = __builtin_convertvector(bf16_bits(v), vh);
        memcpy((uint16_t *)out + i, &h, sizeof h);
    } else {
        memcpy((float *)out + i, &v, sizeof v);
    }
}

/* out[0..n) = q[0..n) as bfloat16 (bf16 = 1) or float32, n a multiple of 16. Returns 0, or -1. */
int convert_int8(const int8_t *q, void *out, long n, int bf16, int threads) {
    if (n < 0 || n % V) return -1;
    long blocks = n / V;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long j = 0; j < blocks; j++) put16(out, j * V, load_i8(q + j * V), bf16);
    return 0;
}

/* out[o, k] = code(o, k) * s[o, k / G] + b[o, k / G] for O rows of I int4 codes (model/quant4.py's
 * layout: blocks of 32 inputs in 16 bytes, input j in the low nibble of byte j and input j + 16 in
 * its high nibble; float16 scales and offsets [O, I / G]), as bfloat16 (bf16 = 1) or float32.
 * Returns 0, or -1 for bad arguments. */
int convert_int4(const uint8_t *w, const uint16_t *s, const uint16_t *b, void *out, long O, long I, long G, int bf16,
                 int threads) {
    if (O < 0 || G < 32 || G % 32 || I % G) return -1;
    long ng = I / G;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long o = 0; o < O; o++) {
        const uint8_t *wr = w + o * (I / 2);
        for (long g = 0; g < ng; g++) {
            float sf = half_to_f32(s[o * ng + g]), bf = half_to_f32(b[o * ng + g]);
            vf sv = (vf){0} + sf, bv = (vf){0} + bf;
            for (long k = g * G; k < (g + 1) * G; k += 32) {
                vb c;
                memcpy(&c, wr + k / 2, sizeof c);
                vf lo = __builtin_convertvector(__builtin_convertvector(c & 15, vi), vf);
                vf hi = __builtin_convertvector(__builtin_convertvector(c >> 4, vi), vf);
                vf plo = lo * sv, phi = hi * sv;
                put16(out, o * I + k, plo + bv, bf16);
                put16(out, o * I + k + V, phi + bv, bf16);
            }
        }
    }
    return 0;
}
