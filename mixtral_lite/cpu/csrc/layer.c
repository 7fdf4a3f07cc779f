/* A whole decoder layer in one call (decoding on the CPU), and the router it needs: Mixtral's
 * softmax, top-k and renormalisation, choosing the same experts as torch.topk, ties included. */
#include "kernel.h"

/* One candidate of the top-k: a probability and its expert. */
typedef struct {
    float v;
    int64_t i;
} Pick;

/* torch.topk's order for largest=True: NaN first, then larger values. */
static inline int before(Pick a, Pick b) { return (isnan(a.v) && !isnan(b.v)) || a.v > b.v; }

static inline void swap(Pick *a, Pick *b) {
    Pick t = *a;
    *a = *b;
    *b = t;
}

/* The selection below is the one torch.topk's CPU kernel makes with the C++ library's
 * std::nth_element (introselect) followed by std::sort of the first k - 1 picks, step for step
 * (median-of-three pivot, unguarded partition, heap select when the depth runs out, insertion
 * sort), so that ties between experts resolve to the same indices. */

static void insertion_sort(Pick *first, Pick *last) {
    if (first == last) return;
    for (Pick *i = first + 1; i != last; ++i) {
        Pick val = *i;
        if (before(val, *first)) {
            memmove(first + 1, first, sizeof(Pick) * (size_t)(i - first));
            *first = val;
        } else {
            Pick *hole = i, *next = i - 1;
            while (before(val, *next)) {
                *hole = *next;
                hole = next--;
            }
            *hole = val;
        }
    }
}

static void push_heap(Pick *first, long hole, long top, Pick val) {
    long parent = (hole - 1) / 2;
    while (hole > top && before(first[parent], val)) {
        first[hole] = first[parent];
        hole = parent;
        parent = (hole - 1) / 2;
    }
    first[hole] = val;
}

static void adjust_heap(Pick *first, long hole, long len, Pick val) {
    long top = hole, child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (before(first[child], first[child - 1])) child--;
        first[hole] = first[child];
        hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        first[hole] = first[child - 1];
        hole = child - 1;
    }
    push_heap(first, hole, top, val);
}

static void heap_select(Pick *first, Pick *middle, Pick *last) {
    long len = middle - first;
    if (len >= 2)
        for (long parent = (len - 2) / 2;; parent--) {
            adjust_heap(first, parent, len, first[parent]);
            if (parent == 0) break;
        }
    for (Pick *i = middle; i < last; ++i)
        if (before(*i, *first)) { /* pop the heap's top into i */
            Pick val = *i;
            *i = *first;
            adjust_heap(first, 0, len, val);
        }
}

static void median_to_first(Pick *result, Pick *a, Pick *b, Pick *c) {
    if (before(*a, *b)) {
        if (before(*b, *c))
            swap(result, b);
        else if (before(*a, *c))
            swap(result, c);
        else
            swap(result, a);
    } else if (before(*a, *c))
        swap(result, a);
    else if (before(*b, *c))
        swap(result, c);
    else
        swap(result, b);
}

static Pick *partition(Pick *first, Pick *last, Pick *pivot) {
    for (;;) {
        while (before(*first, *pivot)) ++first;
        --last;
        while (before(*pivot, *last)) --last;
        if (!(first < last)) return first;
        swap(first, last);
        ++first;
    }
}

static long floor_log2(long n) {
    long k = 0;
    while (n > 1) n >>= 1, k++;
    return k;
}

static void nth_element(Pick *first, Pick *nth, Pick *last) {
    if (first == last || nth == last) return;
    long depth = floor_log2(last - first) * 2;
    while (last - first > 3) {
        if (depth == 0) {
            heap_select(first, nth + 1, last);
            swap(first, nth);
            return;
        }
        --depth;
        Pick *mid = first + (last - first) / 2;
        median_to_first(first, first + 1, mid, last - 1);
        Pick *cut = partition(first + 1, last, first);
        if (cut <= nth)
            first = cut;
        else
            last = cut;
    }
    insertion_sort(first, last);
}

/* The router of M rows: softmax of logits [M, E] (bfloat16 if bf16, else float32) in float32, the K
 * largest probabilities (idx [M, K], in torch.topk's order), renormalised to sum 1 (rw [M, K]).
 * K is limited to what torch.topk selects this way: 1 <= K <= 17, K <= E, 64 * K > E. Returns 0,
 * or -1 for other K or E (nothing written). */
int few_rows_route(const void *logits, long M, long E, long K, int bf16, int64_t *idx, float *rw) {
    if (K < 1 || K > 17 || K > E || 64 * K <= E) return -1;
    Pick *q = malloc(sizeof(Pick) * (size_t)E);
    if (!q) return -1;
    for (long m = 0; m < M; m++) {
        float mx = -INFINITY;
        for (long e = 0; e < E; e++) {
            float l = at(logits, m * E + e, bf16);
            mx = isnan(l) || isnan(mx) ? NAN : (l > mx ? l : mx);
        }
        float sum = 0;
        for (long e = 0; e < E; e++) {
            q[e].v = expf(at(logits, m * E + e, bf16) - mx);
            q[e].i = e;
            sum += q[e].v;
        }
        float inv = 1.0f / sum;
        for (long e = 0; e < E; e++) q[e].v *= inv;
        nth_element(q, q + K - 1, q + E);
        insertion_sort(q, q + K - 1);
        float top = 0;
        for (long j = 0; j < K; j++) top += q[j].v;
        for (long j = 0; j < K; j++) {
            idx[m * K + j] = q[j].i;
            rw[m * K + j] = q[j].v / top;
        }
    }
    free(q);
    return 0;
}

/* One decoder layer's weights and settings (see model.Block): the attention half's (wtype_attention;
 * int8 with scales sq..so; int4 with float16 scales sq..so and offsets bq..bo; else NULL) and the
 * MoE half's (router gate [E, D] of the activations' dtype; stacked experts w1, w3 [E, I, D],
 * w2 [E, D, I] of wtype_experts, int8 with scales, int4 with scales and offsets). G: the inputs per
 * group of the int4 weights (0 without). */
typedef struct {
    const void *attention_norm, *wq, *wk, *wv, *wo, *sq, *sk, *sv, *so, *bq, *bk, *bv, *bo;
    const void *ffn_norm, *gate, *w1, *w3, *w2, *s1, *s3, *s2, *b1, *b3, *b2;
    float attention_eps, ffn_eps;
    int wtype_attention, wtype_experts, bf16;
    long D, H, KV, hd, E, I, K, G;
} Layer;

/* A Mixtral decoder layer for M = B * T (1..LAYER_MAXM) rows of x [M, D], in one call:
 *     h = x + attention(attention_norm(x))          (few_rows_attention_block: writes the cache)
 *     n, logits = ffn_norm(h), ffn_norm(h) @ gate.T  (few_rows_norm_gate; logits [M, E] out)
 *     out = h + sum_j rw[j] * expert_{idx[j]}(n)     (few_rows_route, then few_rows_experts)
 * cos, sin [M, hd]; caches [B, KV, S, hd]; slots [T]; mask [B, T, S] additive. Returns 0, or -1 for
 * bad arguments (nothing written) or a failed allocation. */
int few_rows_layer(const Layer *L, const void *x, void *out, void *logits, const void *cos, const void *sin,
                   void *k_cache, void *v_cache, const int64_t *slots, const void *mask, long B, long T, long S,
                   int threads) {
    long M = B * T, D = L->D, E = L->E, K = L->K;
    int bf16 = L->bf16;
    if (M < 1 || M > LAYER_MAXM || E < 1 || L->I < 1 || K < 1 || K > 17 || K > E || 64 * K <= E ||
        bad_types(L->wtype_experts, L->s1, bf16) || (L->s1 == NULL) != (L->s3 == NULL) ||
        (L->s1 == NULL) != (L->s2 == NULL) || bad_groups(L->wtype_experts, L->b1, L->G, D) ||
        bad_groups(L->wtype_experts, L->b3, L->G, D) || bad_groups(L->wtype_experts, L->b2, L->G, L->I))
        return -1;
    size_t el = bf16 ? 2 : 4;
    char *h = malloc(el * M * D), *n = malloc(el * M * D);
    int64_t *idx = malloc(sizeof(int64_t) * M * K);
    float *rw = malloc(sizeof(float) * M * K);
    int rc = !h || !n || !idx || !rw ? -1 : 0;
    if (rc == 0)
        rc = few_rows_attention_block(x, L->attention_norm, L->attention_eps, L->wq, L->wk, L->wv, L->wo, L->sq,
                                      L->sk, L->sv, L->so, L->bq, L->bk, L->bv, L->bo, L->wtype_attention, L->G, cos,
                                      sin, k_cache, v_cache, slots, mask, h, B, T, D, L->H, L->KV, L->hd, S, bf16,
                                      threads);
    if (rc == 0) rc = few_rows_norm_gate(h, L->ffn_norm, L->ffn_eps, L->gate, n, logits, M, D, E, bf16, threads);
    if (rc == 0) rc = few_rows_route(logits, M, E, K, bf16, idx, rw);
    if (rc == 0)
        rc = few_rows_experts(L->w1, L->w3, L->w2, L->s1, L->s3, L->s2, L->b1, L->b3, L->b2, L->wtype_experts, L->G, E,
                              idx, rw, K, h, n, out, M, D, L->I, bf16, threads);
    free(h);
    free(n);
    free(idx);
    free(rw);
    return rc;
}
