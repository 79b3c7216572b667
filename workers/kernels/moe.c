/* A mixture-of-experts layer's routed experts in one call (workers/arch/moe.py): every token's
 * top-k experts, each a SwiGLU MLP in a native block format, summed with the routing weights.
 *
 * Why: at one decode stream a token's k = 8 experts cost 3 small products each, and from Python
 * every one is a ctypes call of a few microseconds, more than the product itself (bench/moe.py's
 * experts, hidden 256 and 128 features: 96 KB of int8 each). Here the whole layer is one call: the grouping by expert,
 * the products (the same cortex_q4_matmul / cortex_q8_matmul the Python path calls, on the same
 * rows, so the same bits per row), SwiGLU and the weighted sum.
 *
 * Grouping: each active expert runs once over its tokens, gathered into contiguous rows (a
 * counting sort of the (token, choice) pairs by expert, stable: tokens in batch order); inactive
 * experts cost nothing. A token's k results are then added in the order of its choices, so its
 * sum does not depend on which other tokens share the step.
 *
 * The router (cortex_moe_route) for decode.c's whole-step path: float32 logits, then as
 * transformers' Qwen3-MoE router: softmax, the k largest, renormalised (norm_topk) or not.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* y[M, n] = x[M, k] @ w^T in w's block format (decode.c's products too). */
int cortex_linear(const linear_t *w, const float *x, int M, float *y) {
    if (w->m) return cortex_q4_matmul(x, M, (int)w->k, (const uint8_t *)w->q, w->d, w->m, (int)w->n, y);
    return cortex_q8_matmul(x, M, (int)w->k, (const int8_t *)w->q, w->d, (int)w->n, y);
}

/* pos[p] for each pair p = t * k + j: where its row sits once the pairs are sorted by expert;
 * count[e]: expert e's tokens. Returns -2 for an expert id out of range. */
static int sort_pairs(const int64_t *ids, int pairs, int64_t experts, int *count, int *start, int *pos) {
    memset(count, 0, sizeof(int) * experts);
    for (int p = 0; p < pairs; p++) {
        if (ids[p] < 0 || ids[p] >= experts) return -2;
        count[ids[p]]++;
    }
    for (int64_t e = 0, at = 0; e < experts; e++) start[e] = at, at += count[e];
    for (int p = 0; p < pairs; p++) pos[p] = start[ids[p]]++;
    for (int64_t e = 0; e < experts; e++) start[e] -= count[e]; /* back to each run's first row */
    return 0;
}

/* One expert over its n gathered rows, in place: rows [n, H] -> rows [n, H]. */
static int expert(const moe_t *m, int64_t e, float *rows, int n) {
    float *gu = malloc(sizeof(float) * n * 2 * m->inter), *act = malloc(sizeof(float) * n * m->inter);
    int rc = (gu && act) ? cortex_linear(&m->gate_up[e], rows, n, gu) : -1;
    if (!rc) {
        cortex_swiglu(gu, n, (int)m->inter, act);
        rc = cortex_linear(&m->down[e], act, n, rows);
    }
    free(gu), free(act);
    return rc;
}

/* Every active expert (active[0 .. n)) over its run of rows. With several threads and at least two
 * experts per thread, the threads take whole experts, each running its products on one thread,
 * rather than splitting every small product's output rows and meeting at a barrier after each of
 * them (3 per expert); fewer experts (a prefill through a few) split each product instead. Each
 * expert's rows get the same values either way. */
static int run_experts(const moe_t *m, const int *active, int n, const int *count, const int *start, float *rows,
                       int H) {
    int rc = 0;
    const int threads = omp_get_max_threads();
    if (threads > 1 && n >= 2 * threads && !omp_in_parallel()) {
#pragma omp parallel reduction(min : rc)
        {
            /* the products' own parallel regions, nested in this one: one thread each (this sets
             * the ICV of this region's task only: it ends with the region) */
            omp_set_num_threads(1);
#pragma omp for schedule(dynamic)
            for (int a = 0; a < n; a++) {
                const int e = active[a], mine = expert(m, e, rows + (size_t)start[e] * H, count[e]);
                rc = mine < rc ? mine : rc;
            }
        }
        return rc;
    }
    for (int a = 0; a < n && !rc; a++)
        rc = expert(m, active[a], rows + (size_t)start[active[a]] * H, count[active[a]]);
    return rc;
}

/* y[t] = sum_j w[t, j] * expert_{ids[t, j]}(x[t]) for the T rows of x [T, H]; ids int64 [T, k],
 * w float32 [T, k]. Returns 0, -1 when a buffer could not be allocated, -2 for a bad expert id. */
int cortex_moe_experts(const float *x, int T, int H, const int64_t *ids, const float *w, int k, const moe_t *m,
                       float *y) {
    const int pairs = T * k;
    if (!pairs) return 0;
    int *count = malloc(sizeof(int) * m->experts), *start = malloc(sizeof(int) * m->experts);
    int *pos = malloc(sizeof(int) * pairs), *active = malloc(sizeof(int) * m->experts);
    float *rows = malloc(sizeof(float) * pairs * H);
    int rc = (count && start && pos && active && rows) ? 0 : -1;
    if (!rc) rc = sort_pairs(ids, pairs, m->experts, count, start, pos);
    int n = 0;
    for (int64_t e = 0; !rc && e < m->experts; e++)
        if (count[e]) active[n++] = (int)e;
    if (!rc)
        for (int p = 0; p < pairs; p++) memcpy(rows + (size_t)pos[p] * H, x + (size_t)(p / k) * H, sizeof(float) * H);
    if (!rc) rc = run_experts(m, active, n, count, start, rows, H);
    for (int t = 0; !rc && t < T; t++) {
        float *out = y + (size_t)t * H;
        const float *first = rows + (size_t)pos[t * k] * H;
        for (int i = 0; i < H; i++) out[i] = w[t * k] * first[i];
        for (int j = 1; j < k; j++) {
            const float wj = w[t * k + j], *r = rows + (size_t)pos[t * k + j] * H;
            for (int i = 0; i < H; i++) out[i] += wj * r[i];
        }
    }
    free(count), free(start), free(pos), free(active), free(rows);
    return rc;
}

/* x . r over H floats: eight lanes and two accumulators, so the adds are not one serial chain
 * (a strict float order does not vectorise by itself: a serial chain of adds would take Qwen3-30B's
 * router, 128 x 2048, about 0.3 ms a token and layer). */
static float dot(const float *r, const float *x, int H) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= H; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    __m256 a = _mm256_add_ps(a0, a1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float sum = _mm_cvtss_f32(s);
    for (; i < H; i++) sum += r[i] * x[i];
    return sum;
}

/* The k largest of logits[E], largest first, into id / val; on equal values the lower expert id
 * first, as torch.topk. */
static void top_k(const float *logits, int64_t E, int k, int64_t *id, float *val) {
    int n = 0;
    for (int64_t e = 0; e < E; e++) {
        if (n == k && !(logits[e] > val[k - 1])) continue;
        int at = n < k ? n++ : k - 1;
        for (; at > 0 && logits[e] > val[at - 1]; at--) id[at] = id[at - 1], val[at] = val[at - 1];
        id[at] = e, val[at] = logits[e];
    }
}

/* The router of T rows h [T, H]: ids [T, k] and weights [T, k], the largest first. Renormalised
 * (norm_topk), the weights are the softmax of the k largest logits alone (the full softmax's
 * denominator cancels); else the k largest of the softmax over all experts (the same order).
 * Returns 0, or -1 when a buffer could not be allocated. */
int cortex_moe_route(const float *h, int T, int H, const moe_t *m, int64_t *ids, float *w) {
    const int64_t E = m->experts;
    const int k = (int)m->top_k;
    float *logits = malloc(sizeof(float) * E);
    if (!logits) return -1;
    for (int t = 0; t < T; t++) {
        const float *x = h + (size_t)t * H;
        int64_t *id = ids + (size_t)t * k;
        float *wt = w + (size_t)t * k;
        for (int64_t e = 0; e < E; e++) logits[e] = dot(m->router + (size_t)e * H, x, H);
        top_k(logits, E, k, id, wt);
        const float top = wt[0]; /* the largest logit: softmax's shift either way */
        float denom = 0.0f;
        if (m->norm_topk)
            for (int j = 0; j < k; j++) denom += expf(wt[j] - top);
        else
            for (int64_t e = 0; e < E; e++) denom += expf(logits[e] - top);
        for (int j = 0; j < k; j++) wt[j] = expf(wt[j] - top) / denom;
    }
    free(logits);
    return 0;
}

/* A whole MoE MLP for decode.c: route the rows h [T, H], then their experts into out [T, H].
 * Returns as cortex_moe_experts. */
int cortex_moe_block(const float *h, int T, int H, const moe_t *m, float *out) {
    const size_t pairs = (size_t)T * m->top_k;
    int64_t *ids = malloc(sizeof(int64_t) * pairs);
    float *w = malloc(sizeof(float) * pairs);
    int rc = (ids && w) ? cortex_moe_route(h, T, H, m, ids, w) : -1;
    if (!rc) rc = cortex_moe_experts(h, T, H, ids, w, (int)m->top_k, m, out);
    free(ids), free(w);
    return rc;
}
