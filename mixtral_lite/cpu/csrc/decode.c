/* Decoding entries beyond single products: RMSNorm (and its many-row form for prefill), the step's
 * attention mask, attention against the KV cache, the rotary embedding, the q/k/v projections with
 * it, the attention half of a decoder layer in one call and the MoE half's norm plus router
 * product. Each rounds where the plain PyTorch ops round. */
#include "kernel.h"

/* RMSNorm of M rows of D values (decoding: a few rows, one thread), in Hugging Face's order of
 * rounding: bfloat16 (bf16 = 1) y = bf16(w * bf16(x * r)), float32 y = x * r * w, with
 * r = 1 / sqrt(mean(x^2) + eps) in float32. x, w and y share the dtype. */
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

/* model.build_mask against a cache, in its additive form and in one pass: mask[b, t, s] = 0 where the
 * query at slot q_slots[t] sees key slot s (s <= q_slots[t]; slot s real (k_valid[b, s]) or the
 * query's own; with a window (windowed = 1): q_pos[b, t] - k_pos[b, s] < window), else -inf.
 * q_pos [B, T], k_pos [B, S] int64, k_valid [B, S] bool bytes, mask [B, T, S] bfloat16 or float32. */
void few_rows_mask(const int64_t *q_slots, const int64_t *q_pos, const int64_t *k_pos, const uint8_t *k_valid,
                   long B, long T, long S, int windowed, long window, void *mask, int bf16) {
    for (long b = 0; b < B; b++)
        for (long t = 0; t < T; t++) {
            long qs = q_slots[t], qp = q_pos[b * T + t], row = (b * T + t) * S;
            for (long s = 0; s < S; s++) {
                int keep = s <= qs && (k_valid[b * S + s] || s == qs);
                if (windowed) keep = keep && qp - k_pos[b * S + s] < window;
                if (bf16)
                    ((uint16_t *)mask)[row + s] = keep ? 0 : 0xff80; /* -inf */
                else
                    ((float *)mask)[row + s] = keep ? 0.0f : -INFINITY;
            }
        }
}

/* RMSNorm of many rows (prefill), few_rows_rmsnorm's rounding, the rows spread over the threads: one
 * pass where PyTorch's bfloat16 path makes six. */
void many_rows_rmsnorm(const void *x, const void *w, void *y, long M, long D, float eps, int bf16, int threads) {
    size_t el = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long m = 0; m < M; m++)
        few_rows_rmsnorm((const char *)x + el * m * D, w, (char *)y + el * m * D, 1, D, eps, bf16);
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
        (sq == NULL) != (sk == NULL) || (sq == NULL) != (sv == NULL) || wtype == W_INT4)
        return -1;
    Act ax;
    if (act_init(&ax, x, M, D, bf16, wtype, 0) != 0) return -1;
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

/* The attention half of a decoder layer for M = B * T (1..LAYER_MAXM) rows, in one call:
 *     h = x + wo @ attention(rope(wq @ n), rope(wk @ n), wv @ n),  n = rmsnorm(x) * norm_w,
 * with rope's k and v written into the cache at slots[t] first (k_cache, v_cache [B, KV, S, hd]).
 * Each step rounds as the separate entries (few_rows_rmsnorm, few_rows_qkv, few_rows_attention,
 * few_rows) and the residual sum as PyTorch's add. Weights of type wtype (int8: scales; int4:
 * float16 scales and offsets bq..bo, groups of G inputs; else NULL), cos, sin [M, hd], mask
 * [B, T, S] additive; x, h [M, D]. Returns 0, or -1 for bad arguments (nothing written: neither h
 * nor the cache) or a failed allocation. */
int few_rows_attention_block(const void *x, const void *norm_w, float eps, const void *wq, const void *wk,
                             const void *wv, const void *wo, const void *sq, const void *sk, const void *sv,
                             const void *so, const void *bq, const void *bk, const void *bv, const void *bo,
                             int wtype, long G, const void *cos, const void *sin, void *k_cache, void *v_cache,
                             const int64_t *slots, const void *mask, void *h, long B, long T, long D, long H, long KV,
                             long hd, long S, int bf16, int threads) {
    long M = B * T, Oq = H * hd, Okv = KV * hd;
    if (M < 1 || M > LAYER_MAXM || hd < 2 || hd % 2 || KV < 1 || H % KV || S < 1 || bad_types(wtype, sq, bf16) ||
        (sq == NULL) != (sk == NULL) || (sq == NULL) != (sv == NULL) || (sq == NULL) != (so == NULL) ||
        bad_groups(wtype, bq, G, D) || bad_groups(wtype, bk, G, D) || bad_groups(wtype, bv, G, D) ||
        bad_groups(wtype, bo, G, Oq))
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
    int view = act_view(bf16, wtype); /* then y is prepared for wo before it is written: one barrier less */
    if (!failed) {
        few_rows_rmsnorm(x, norm_w, n, M, D, eps, bf16);
        failed = act_init(&ax, n, M, D, bf16, wtype, G) != 0;
    }
    if (!failed && view) failed = act_init(&ay, y, M, Oq, bf16, wtype, G) != 0;
    if (!failed) {
        Out oq = {q, sq, Oq, bf16, NULL, bq}, ok = {k, sk, Okv, bf16, NULL, bk}, ov = {v, sv, Okv, bf16, NULL, bv};
        Out oh = {h, so, D, bf16, x, bo};
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
            if (!view) {
#pragma omp single
                failed = act_init(&ay, y, M, Oq, bf16, wtype, G) != 0;
            }
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

/* RMSNorm of M (1..LAYER_MAXM) rows and the router's product in one call: n = rmsnorm(x) * norm_w (as
 * few_rows_rmsnorm), logits = n @ gate.T [M, E] (as few_rows). Returns 0, or -1 for bad arguments
 * or a failed allocation. */
int few_rows_norm_gate(const void *x, const void *norm_w, float eps, const void *gate, void *n, void *logits, long M,
                       long D, long E, int bf16, int threads) {
    if (M < 1 || M > LAYER_MAXM) return -1;
    few_rows_rmsnorm(x, norm_w, n, M, D, eps, bf16);
    return few_rows(gate, bf16 ? W_BF16 : W_F32, NULL, n, logits, M, E, D, bf16, threads);
}
