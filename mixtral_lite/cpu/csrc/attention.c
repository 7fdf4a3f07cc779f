/* Attention of many query rows (prefill) on the CPU, in float32 as PyTorch's
 * scaled_dot_product_attention computes it on float32 copies, blocked so that the arithmetic runs
 * as small matrix products in registers: R query rows of one head against 16 keys at a time
 * (scores), then R rows times one 16-wide slice of the values (output). Keys are transposed once
 * per call into blocks of 16 ([S / 16][hd][16] per key/value head) and bfloat16 values converted
 * once, so each block is read contiguously; work units (a head and R query rows) only visit keys
 * up to the last one their mask lets through (causal prefill: half of them). */
#include "kernel.h"

#define R 8 /* query rows per unit */

static inline int all_masked(vf m) {
    for (int l = 0; l < V; l++)
        if (m[l] != -INFINITY) return 0;
    return 1;
}

/* Whether key s is visible to the query row at t (mask [T, S] of this batch row, or causal). */
static inline float bias(const void *mask, long t, long s, long S, int bf16) {
    if (!mask) return s <= t ? 0.0f : -INFINITY;
    return at(mask, t * S + s, bf16);
}

/* y[b, t, h] = softmax_s(q[b, h, t] . k[b, g, s] * scale + mask[b, t, s]) @ v[b, g, s] for every batch
 * row b, head h (g = h / (H / KV): grouped heads share a key/value head) and query t; q
 * [B, H, T, hd] with element strides qb, qh, qt (hd contiguous); k, v [B, KV, S, hd] contiguous;
 * mask [B, T, S] additive (0 or -inf: masked keys count for nothing), or NULL for causal attention
 * with T == S; y [B, T, H, hd]. All bfloat16 (bf16 = 1) or float32; float32 sums, one rounding at the
 * end. hd must be a multiple of 16. Returns 0, or -1 for bad arguments or a failed allocation
 * (nothing written). */
int many_rows_attention(const void *q, long qb, long qh, long qt, const void *k, const void *v, const void *mask,
                        void *y, long B, long H, long KV, long T, long S, long hd, float scale, int bf16,
                        int threads) {
    if (B < 1 || T < 1 || S < 1 || hd < V || hd % V || KV < 1 || H % KV || (!mask && T != S)) return -1;
    long blocks = (S + V - 1) / V, Sp = blocks * V, heads = B * KV;
    int nt = threads > 0 ? threads : 1;
    float *kt = malloc(sizeof(float) * (size_t)heads * Sp * hd);             /* [B*KV][blocks][hd][16] */
    float *vf32 = bf16 ? malloc(sizeof(float) * (size_t)heads * S * hd) : NULL; /* [B*KV][S][hd] */
    float *scratch = malloc(sizeof(float) * (size_t)nt * R * (Sp + hd));     /* per thread: p, qf */
    if (!kt || (bf16 && !vf32) || !scratch) {
        free(kt);
        free(vf32);
        free(scratch);
        return -1;
    }
    long units_t = (T + R - 1) / R, units = B * H * units_t, used = 0;
    long *seen = malloc(sizeof(long) * 2 * (size_t)B * T); /* per query row: the keys it sees, [first, end) */
    if (!seen) {
        free(kt);
        free(vf32);
        free(scratch);
        return -1;
    }
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (long bt = 0; bt < B * T; bt++) {
            long s0 = 0, s1 = S, t = bt % T;
            const void *mb = mask ? (const char *)mask + (bf16 ? 2 : 4) * (size_t)(bt / T) * T * S : NULL;
            if (mb) /* whole blocks of 16 masked keys at the end (a cache longer than the prompt) */
                while (s1 >= V && all_masked(load_any(mb, t * S + s1 - V, bf16))) s1 -= V;
            while (s1 > 0 && bias(mb, t, s1 - 1, S, bf16) == -INFINITY) s1--;
            if (mb)
                while (s0 + V <= s1 && all_masked(load_any(mb, t * S + s0, bf16))) s0 += V;
            while (s0 < s1 && bias(mb, t, s0, S, bf16) == -INFINITY) s0++;
            seen[2 * bt] = s0, seen[2 * bt + 1] = s1;
        }
#pragma omp single
        for (long bt = 0; bt < B * T; bt++) /* keys past the last any row sees are never read */
            if ((seen[2 * bt + 1] + V - 1) / V > used) used = (seen[2 * bt + 1] + V - 1) / V;
#pragma omp for schedule(static)
        for (long u = 0; u < heads * used; u++) { /* keys transposed into blocks of 16, zero-padded */
            long hb = u / used, jb = u % used;
            float *dst = kt + ((size_t)hb * blocks + jb) * hd * V;
            for (long d = 0; d < hd; d++)
                for (long l = 0; l < V; l++) {
                    long s = jb * V + l;
                    dst[d * V + l] = s < S ? at(k, ((size_t)hb * S + s) * hd + d, bf16) : 0.0f;
                }
            if (bf16)
                for (long s = jb * V; s < jb * V + V && s < S; s++)
                    for (long d = 0; d < hd; d++)
                        vf32[((size_t)hb * S + s) * hd + d] = at(v, ((size_t)hb * S + s) * hd + d, bf16);
        }
        const float *vals = bf16 ? vf32 : (const float *)v;
        float *p = scratch + (size_t)omp_get_thread_num() * R * (Sp + hd), *qf = p + (size_t)R * Sp;
        vf lane;
        for (int l = 0; l < V; l++) lane[l] = (float)l;
#pragma omp for schedule(dynamic, 1)
        for (long u = 0; u < units; u++) {
            long b = u / (H * units_t), h = u / units_t % H, t0 = u % units_t * R;
            long rows = T - t0 < R ? T - t0 : R, g = h / (H / KV), hb = b * KV + g;
            const void *mb = mask ? (const char *)mask + (bf16 ? 2 : 4) * (size_t)b * T * S : NULL;
            long first = S, end = 0; /* the keys any of these rows sees */
            for (long r = 0; r < rows; r++) {
                long s0 = seen[2 * (b * T + t0 + r)], s1 = seen[2 * (b * T + t0 + r) + 1];
                if (s1 > end) end = s1;
                if (s0 < s1 && s0 < first) first = s0;
            }
            for (long r = 0; r < R; r++)
                for (long d = 0; d < hd; d++)
                    qf[r * hd + d] = r < rows ? at(q, b * qb + h * qh + (t0 + r) * qt + d, bf16) : 0.0f;
            long j0 = first < end ? first / V : 0, j1 = first < end ? (end + V - 1) / V : 0;
            for (long jb = j0; jb < j1; jb++) { /* scores, 16 keys at a time */
                const float *kb = kt + ((size_t)hb * blocks + jb) * hd * V;
                vf acc[R];
                for (int r = 0; r < R; r++) acc[r] = (vf){0};
                for (long d = 0; d < hd; d++) {
                    vf kv = load_f32(kb + d * V);
                    for (int r = 0; r < R; r++) acc[r] += splat(qf[r * hd + d]) * kv;
                }
                for (int r = 0; r < R; r++) {
                    acc[r] *= splat(scale);
                    memcpy(p + (size_t)r * Sp + jb * V, &acc[r], sizeof acc[r]);
                }
            }
            for (long r = 0; r < rows; r++) { /* mask, softmax */
                float *pr = p + (size_t)r * Sp;
                long t = t0 + r;
                vf mx = splat(-INFINITY);
                for (long s = j0 * V; s < j1 * V; s += V) {
                    vf x = load_f32(pr + s), m;
                    if (s + V > S) {
                        for (int l = 0; l < V; l++) m[l] = s + l < S ? bias(mb, t, s + l, S, bf16) : -INFINITY;
                    } else if (mb) {
                        m = load_any(mb, t * S + s, bf16);
                    } else {
                        m = select_f(lane + splat((float)s) <= splat((float)t), splat(0.0f), splat(-INFINITY));
                    }
                    x = select_f(m == splat(-INFINITY), m, x + m); /* masked: -inf, whatever the key holds */
                    mx = select_f(x > mx, x, mx);
                    memcpy(pr + s, &x, sizeof x);
                }
                float top = -INFINITY;
                for (int l = 0; l < V; l++)
                    if (mx[l] > top) top = mx[l];
                vf sum = (vf){0};
                for (long s = j0 * V; s < j1 * V; s += V) {
                    vf e = vexp(load_f32(pr + s) - splat(top));
                    sum += e;
                    memcpy(pr + s, &e, sizeof e);
                }
                qf[r * hd] = hsum(sum); /* qf's row is free now: it keeps the row's sum */
            }
            for (long c = 0; c < hd; c += V) { /* output: rows x one 16-wide slice of the values */
                vf acc[R];
                for (int r = 0; r < R; r++) acc[r] = (vf){0};
                for (long s = first; s < end; s++) { /* the keys some row sees */
                    vf vv = load_f32(vals + ((size_t)hb * S + s) * hd + c);
                    for (int r = 0; r < R; r++) acc[r] += splat(p[(size_t)r * Sp + s]) * vv;
                }
                for (long r = 0; r < rows; r++) {
                    vf o = acc[r] / splat(qf[r * hd]);
                    long y0 = ((b * T + t0 + r) * H + h) * hd + c;
                    for (int l = 0; l < V; l++) {
                        if (bf16)
                            ((uint16_t *)y)[y0 + l] = f32_to_bf16(o[l]);
                        else
                            ((float *)y)[y0 + l] = o[l];
                    }
                }
            }
        }
    }
    free(seen);
    free(kt);
    free(vf32);
    free(scratch);
    return 0;
}
