/* Decode attention read straight from the paged KV cache (AVX2 + FMA, float32).
 *
 * One new token per sequence attends to its whole context. Gathering each context into a padded
 * tensor first (what a generic attention call needs) moves every key and value twice and, at 16
 * sequences, cost as much as the model's matrix products; here the query heads walk their
 * sequence's block table in place: scores for every position, an exact softmax over them, then the
 * weighted sum of values. Nothing is copied and no padding is computed.
 *
 * Each (sequence, KV head) is computed in the same order whatever else is in the batch: a sequence
 * gets the same result alone or with others. GQA: query head i reads KV head
 * i / (query heads per KV head), as Hugging Face's repeat_kv does; up to GQ heads of one group are
 * computed together, so each key and value is loaded (and converted from float16) once for all of
 * them rather than once per head.
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <stdlib.h>

#include "simd.h"

/* The four sums of a, b, c, d's lanes, in that order. */
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

#define GQ 4 /* query heads of one KV group computed together: each key and value is loaded once for all */
#define VW 8 /* most vectors of a value row one pass accumulates (see block_values) */

/* Ask for `rows` rows of `span` elements each, from pool element first on, rows `stride` apart
 * (a block of a walk over a block table, ahead of its use): into L1 (l2 = 0) or L2 (l2 = 1). */
static inline void prefetch_rows(const void *pool, size_t first, size_t stride, int rows, size_t span, const int half,
                                 const int l2) {
    const size_t elem = half ? 2 : 4;
    const char *at = (const char *)pool + first * elem;
    for (int j = 0; j < rows; j++, at += stride * elem)
        for (size_t off = 0; off < span * elem; off += 64) {
            if (l2)
                _mm_prefetch(at + off, _MM_HINT_T1);
            else
                _mm_prefetch(at + off, _MM_HINT_T0);
        }
}

/* s[g][j] = scale * q[g] . k[j] for G (a constant after inlining, <= GQ) query heads and the n keys
 * at pool elements k, k + stride, ...: two keys at a time, each eight dimensions of a key loaded
 * (and converted from float16) once for all G heads. */
static inline __attribute__((always_inline)) void scores(const int G, const float *const *q, const void *pool,
                                                         size_t k, size_t stride, int n, int D, float scale,
                                                         float *const *s, int64_t at, const int half) {
    const __m256 zero = _mm256_setzero_ps();
    int j = 0;
    for (; j + 2 <= n; j += 2) {
        const size_t k0 = k + j * stride, k1 = k0 + stride;
        __m256 a[GQ][2];
        for (int g = 0; g < GQ; g++) a[g][0] = a[g][1] = zero;
        for (int i = 0; i < D; i += 8) {
            const __m256 x0 = load_kv(pool, k0 + i, half), x1 = load_kv(pool, k1 + i, half);
            for (int g = 0; g < G; g++) {
                const __m256 qg = _mm256_loadu_ps(q[g] + i);
                a[g][0] = _mm256_fmadd_ps(qg, x0, a[g][0]);
                a[g][1] = _mm256_fmadd_ps(qg, x1, a[g][1]);
            }
        }
        float t[8];
        _mm_storeu_ps(t, _mm_mul_ps(hsum4(a[0][0], a[0][1], a[1][0], a[1][1]), _mm_set1_ps(scale)));
        if (G > 2) _mm_storeu_ps(t + 4, _mm_mul_ps(hsum4(a[2][0], a[2][1], a[3][0], a[3][1]), _mm_set1_ps(scale)));
        for (int g = 0; g < G; g++) s[g][at + j] = t[2 * g], s[g][at + j + 1] = t[2 * g + 1];
    }
    if (j < n) { /* an odd last key */
        __m256 a[GQ];
        for (int g = 0; g < GQ; g++) a[g] = zero;
        for (int i = 0; i < D; i += 8) {
            const __m256 x = load_kv(pool, k + j * stride + i, half);
            for (int g = 0; g < G; g++) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q[g] + i), x, a[g]);
        }
        float t[4];
        _mm_storeu_ps(t, _mm_mul_ps(hsum4(a[0], a[1], a[2], a[3]), _mm_set1_ps(scale)));
        for (int g = 0; g < G; g++) s[g][at + j] = t[g];
    }
}

/* Softmax in place over p[0 .. L): subtract the largest score, exponentiate eight at a time (p has
 * room up to the next multiple of 8); returns 1 / the sum of the weights (0 when it is 0). */
static float softmax(float *p, int64_t L) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < L; j++) mx = p[j] > mx ? p[j] : mx;
    for (int64_t j = L; j < ((L + 7) & ~7); j++) p[j] = -INFINITY;
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < L; j += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(p + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    const float l = hsum(sum);
    return l > 0.0f ? 1.0f / l : 0.0f;
}

/* Dimensions c .. c + 8 W of out[g] += sum over the n values of one block (pool elements v,
 * v + stride, ...) of p[g][j] * v[j], for G heads (G, W constants after inlining); out starts at
 * zero with the first block (first). Each value vector is loaded once for all G heads. The sums
 * stay in float32 between blocks, so the order of additions is the same as one pass over the
 * whole context. */
static inline __attribute__((always_inline)) void values_pass(const int G, const int W, const float *const *p,
                                                              int n, const void *pool, size_t v, size_t stride, int c,
                                                              int first, float *const *out, const int half) {
    __m256 acc[GQ][VW];
    for (int g = 0; g < G; g++)
        for (int w = 0; w < W; w++) acc[g][w] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out[g] + c + 8 * w);
    for (int j = 0; j < n; j++) {
        __m256 pg[GQ];
        for (int g = 0; g < G; g++) pg[g] = _mm256_set1_ps(p[g][j]);
        for (int w = 0; w < W; w++) {
            const __m256 x = load_kv(pool, v + j * stride + c + 8 * w, half);
            for (int g = 0; g < G; g++) acc[g][w] = _mm256_fmadd_ps(pg[g], x, acc[g][w]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int w = 0; w < W; w++) _mm256_storeu_ps(out[g] + c + 8 * w, acc[g][w]);
}

/* One block's values for G heads: passes as wide as the registers allow (G x W accumulators, at
 * most 12 of the 16), then single vectors for what is left of D. */
static inline __attribute__((always_inline)) void block_values(const int G, const float *const *p, int n,
                                                               const void *pool, size_t v, size_t stride, int D,
                                                               int first, float *const *out, const int half) {
    const int W = G == 1 ? 8 : G == 4 ? 2 : 4;
    int c = 0;
    for (; c + 8 * W <= D; c += 8 * W) values_pass(G, W, p, n, pool, v, stride, c, first, out, half);
    for (; c < D; c += 8) values_pass(G, 1, p, n, pool, v, stride, c, first, out, half);
}

/* A unit of work: up to GQ query heads of one KV head's group, of one sequence. */
typedef struct {
    int G;                  /* query heads: 1 .. GQ */
    size_t kv;              /* the KV head's first element within a slot: h * D */
    const float *q[GQ];     /* [D] each */
    float *out[GQ], *p[GQ]; /* out [D]; p: the context's scores, then weights (room for L + 8) */
    float inv[GQ];          /* 1 / the sum of each head's weights */
} unit_t;

#define BY_G(G, call) \
    switch (G) { \
    case 4: call(4); break; \
    case 3: call(3); break; \
    case 2: call(2); break; \
    default: call(1); \
    }

/* Units u[0 .. U) of one sequence, whose context is L positions in blocks `table`; their KV heads
 * span elements first .. first + span of each slot. The walks over keys and over values go block
 * by block and, within a block, unit by unit: a block holds the rows of all its slots' KV heads
 * together, so what a task reads is one contiguous run at a time, and the next block is prefetched
 * while this one computes (a jump the hardware prefetcher does not follow). */
static inline __attribute__((always_inline)) void sequence(unit_t *u, int U, const void *k, const void *v,
                                                           size_t stride, size_t first, size_t span,
                                                           const int64_t *table, int64_t L, int block, int D,
                                                           float scale, const int half) {
    for (int64_t start = 0; start < L; start += block) {
        const int n = (int)(L - start < block ? L - start : block);
        const size_t base = (size_t)table[start / block] * block * stride;
        if (start + block < L) /* the next block's keys to L1; this block's values to L2 */
            prefetch_rows(k, (size_t)table[start / block + 1] * block * stride + first, stride, block, span, half, 0);
        prefetch_rows(v, base + first, stride, n, span, half, 1);
        for (int i = 0; i < U; i++) {
#define SCORES(G) scores(G, u[i].q, k, base + u[i].kv, stride, n, D, scale, u[i].p, start, half)
            BY_G(u[i].G, SCORES)
#undef SCORES
        }
    }
    for (int i = 0; i < U; i++)
        for (int g = 0; g < u[i].G; g++) u[i].inv[g] = softmax(u[i].p[g], L);
    for (int64_t start = 0; start < L; start += block) {
        const int n = (int)(L - start < block ? L - start : block);
        const size_t base = (size_t)table[start / block] * block * stride;
        if (start + block < L)
            prefetch_rows(v, (size_t)table[start / block + 1] * block * stride + first, stride, block, span, half, 0);
        for (int i = 0; i < U; i++) {
            const float *p[GQ];
            for (int g = 0; g < u[i].G; g++) p[g] = u[i].p[g] + start;
#define VALUES(G) block_values(G, p, n, v, base + u[i].kv, stride, D, start == 0, u[i].out, half)
            BY_G(u[i].G, VALUES)
#undef VALUES
        }
    }
    for (int i = 0; i < U; i++)
        for (int g = 0; g < u[i].G; g++) {
            const __m256 inv = _mm256_set1_ps(u[i].inv[g]);
            float *o = u[i].out[g];
            for (int c = 0; c < D; c += 8) _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(o + c), inv));
        }
}

/* A call's shapes and how it splits into tasks: a task is one sequence's KV heads h0 .. h0 +
 * per_task - 1, all of them when there are sequences enough to keep the threads busy (each task
 * then reads whole blocks), fewer when there are not; and where even one KV head a task leaves
 * too few tasks, and unevenly shared (q_cuts > 0), a range of the sequence's query heads, q_cuts
 * ranges as even as they come (one sequence, three KV heads, two threads: by KV heads thread 0 had
 * two of the three tasks and thread 1 waited on it for half of the attention; by query heads they
 * have 4 and 5 of 9). A query head's scores, softmax and weighted sum are computed the same way
 * whatever heads share its task or unit: the same results whatever the split. */
typedef struct {
    const float *q;
    const void *k, *v;
    const int64_t *tables, *lengths;
    int width, B, Hq, Hkv, D, block, half, group, per_task, q_cuts, tasks_per_seq, max_units;
    float scale;
    float *out;
    size_t stride, room; /* from one slot's K (or V) of a head to the next; a head's scores' room */
} plan_t;

static plan_t plan(const float *q, const void *k, const void *v, const int64_t *tables, int width,
                   const int64_t *lengths, int B, int Hq, int Hkv, int D, int block, float scale, float *out, int half,
                   int threads) {
    plan_t p = {.q = q, .k = k, .v = v, .tables = tables, .lengths = lengths, .width = width, .B = B, .Hq = Hq,
                .Hkv = Hkv, .D = D, .block = block, .half = half, .group = Hq / Hkv};
    int64_t longest = 0;
    for (int b = 0; b < B; b++) longest = lengths[b] > longest ? lengths[b] : longest;
    /* tasks per sequence: enough for two per thread, at most one per KV head */
    const int wanted = B >= 2 * threads ? 1 : (2 * threads + B - 1) / B, cuts = wanted < Hkv ? wanted : Hkv;
    p.per_task = (Hkv + cuts - 1) / cuts;
    p.tasks_per_seq = (Hkv + p.per_task - 1) / p.per_task;
    p.max_units = p.per_task * ((p.group + GQ - 1) / GQ);
    /* by ranges of query heads (see plan_t), only where the KV heads leave the threads uneven: two
     * KV heads on two threads are already even, and each would then read both heads' K and V */
    if (wanted > Hkv && Hkv < Hq && (B * Hkv) % threads) {
        p.q_cuts = p.tasks_per_seq = wanted < Hq ? wanted : Hq;
        const int most = (Hq + p.q_cuts - 1) / p.q_cuts; /* a range's query heads, at most */
        p.max_units = (most / p.group + 2) * ((p.group + GQ - 1) / GQ); /* its KV heads: most / group + 2 at most */
    }
    p.scale = scale, p.out = out;
    p.stride = (size_t)Hkv * D;
    p.room = (size_t)longest + 8;
    return p;
}

/* Task `task` of p, with a thread's units u and score buffer buf (max_units each). */
static void attention_task(const plan_t *p, int task, unit_t *u, float *buf) {
    const int b = task / p->tasks_per_seq, j = task % p->tasks_per_seq, D = p->D, group = p->group;
    int q0, q1; /* the task's query heads */
    if (p->q_cuts) {
        q0 = (int)((int64_t)p->Hq * j / p->q_cuts), q1 = (int)((int64_t)p->Hq * (j + 1) / p->q_cuts);
    } else {
        const int k0 = j * p->per_task, k1 = k0 + p->per_task < p->Hkv ? k0 + p->per_task : p->Hkv;
        q0 = k0 * group, q1 = k1 * group;
    }
    const int h0 = q0 / group, h1 = (q1 - 1) / group + 1; /* their KV heads */
    int U = 0;
    for (int h = h0; h < h1; h++) {
        const int lo = q0 > h * group ? q0 : h * group, hi = q1 < (h + 1) * group ? q1 : (h + 1) * group;
        for (int g0 = lo; g0 < hi; g0 += GQ, U++) { /* up to GQ of the group's heads in the range */
            u[U].G = hi - g0 < GQ ? hi - g0 : GQ;
            u[U].kv = (size_t)h * D;
            for (int g = 0; g < u[U].G; g++) {
                const size_t row = ((size_t)b * p->Hq + g0 + g) * D;
                u[U].q[g] = p->q + row, u[U].out[g] = p->out + row;
                u[U].p[g] = buf + ((size_t)U * GQ + g) * p->room;
            }
        }
    }
    const int64_t L = p->lengths[b], *table = p->tables + (size_t)b * p->width;
    const size_t first = (size_t)h0 * D, span = (size_t)(h1 - h0) * D;
    /* one copy of the loops per pool dtype: no branch per load */
    if (p->half)
        sequence(u, U, p->k, p->v, p->stride, first, span, table, L, p->block, D, p->scale, 1);
    else
        sequence(u, U, p->k, p->v, p->stride, first, span, table, L, p->block, D, p->scale, 0);
}

/* A thread's units and score buffer for p's tasks (NULL when out of memory; free with free). */
static unit_t *units(const plan_t *p, float **buf) {
    unit_t *u = malloc(sizeof(unit_t) * p->max_units);
    *buf = malloc(sizeof(float) * p->max_units * GQ * p->room);
    if (u && *buf) return u;
    free(u), free(*buf);
    return NULL;
}

/* out[b, h] = softmax(scale * q[b, h] . K[b]) V[b] for query head h of sequence b, whose context is
 * positions 0 .. lengths[b] - 1 held in blocks tables[b, 0 ..] of the cache.
 *   q, out: [B, Hq, D]; k, v: [slots, Hkv, D] (slot = block * block + offset), float32, or float16
 *   when half; tables: [B, width].
 * Returns -1 (nothing computed) for shapes it does not handle; the caller then uses PyTorch. */
int cortex_paged_attention(const float *q, const void *k, const void *v, const int64_t *tables, int width,
                           const int64_t *lengths, int B, int Hq, int Hkv, int D, int block, float scale, float *out,
                           int half) {
    if (D % 8 || Hq % Hkv) return -1;
    const plan_t p = plan(q, k, v, tables, width, lengths, B, Hq, Hkv, D, block, scale, out, half,
                          omp_get_max_threads());
    int failed = 0;
#pragma omp parallel if (B * p.tasks_per_seq > 1)
    {
        float *buf; /* per thread, reused */
        unit_t *u = units(&p, &buf);
        if (!u) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < B * p.tasks_per_seq; task++)
            if (u) attention_task(&p, task, u, buf);
        if (u) free(u), free(buf);
    }
    return failed ? -1 : 0;
}

/* cortex_paged_attention's tasks part, part + parts, ... only: for the threads of a parallel region
 * that split a step's attention between them (decode.c), each calling it with its own part. The
 * same results as the whole call. Returns 0, or -1 (nothing computed) as cortex_paged_attention. */
int cortex_attention_part(const float *q, const void *k, const void *v, const int64_t *tables, int width,
                          const int64_t *lengths, int B, int Hq, int Hkv, int D, int block, float scale, float *out,
                          int half, int part, int parts) {
    if (D % 8 || Hq % Hkv) return -1;
    const plan_t p = plan(q, k, v, tables, width, lengths, B, Hq, Hkv, D, block, scale, out, half, parts);
    float *buf;
    unit_t *u = units(&p, &buf);
    if (!u) return -1;
    for (int task = part; task < B * p.tasks_per_seq; task += parts) attention_task(&p, task, u, buf);
    free(u), free(buf);
    return 0;
}

/* RoPE and the KV write of one step, in one pass over the projections.
 *   qkv: [T, Hq + 2 Hkv, D], the step's q, k and v heads; cos, ssin: [T, D] per row, ssin the sin
 *   with the first half negated (rotate_half's sign folded in); slots: [T].
 * Writes rotated q to q_out [T, Hq, D] and rotated k and plain v to the pool's slot of each row
 * (float32 pools, or float16 when half): x * cos + roll(x, D / 2) * ssin, as workers/arch/llama.py's
 * apply_rotary. D must be a multiple of 16 (the caller checks). */
static void rope_row(const float *row, int Hq, int Hkv, int D, const float *c, const float *s, size_t slot,
                     void *k_pool, void *v_pool, float *q_out, int half) {
    const int mid = D / 2;
    for (int h = 0; h < Hq + Hkv; h++) {
        const float *x = row + (size_t)h * D;
        for (int i = 0; i < D; i += 8) {
            const float *partner = x + (i < mid ? i + mid : i - mid);
            const __m256 xc = _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(c + i));
            const __m256 r = _mm256_fmadd_ps(_mm256_loadu_ps(partner), _mm256_loadu_ps(s + i), xc);
            if (h < Hq)
                _mm256_storeu_ps(q_out + (size_t)h * D + i, r);
            else
                store_kv(k_pool, (slot * Hkv + h - Hq) * D + i, r, half);
        }
    }
    for (int h = 0; h < Hkv; h++) {
        const float *x = row + (size_t)(Hq + Hkv + h) * D;
        for (int i = 0; i < D; i += 8) store_kv(v_pool, (slot * Hkv + h) * D + i, _mm256_loadu_ps(x + i), half);
    }
}

/* cos and ssin: row t's angles at row t, or with positions (not NULL), tables whose row p holds
 * position p's (the worker keeps them: no gather per step). */
void cortex_rope_store(const float *qkv, int T, int Hq, int Hkv, int D, const float *cos, const float *ssin,
                       const int64_t *positions, const int64_t *slots, void *k_pool, void *v_pool, float *q_out,
                       int half) {
    const size_t heads = Hq + 2 * Hkv;
#define ANGLES(t) ((size_t)(positions ? positions[t] : (t)) * D)
#define ROW(t) rope_row(qkv + (size_t)(t) * heads * D, Hq, Hkv, D, cos + ANGLES(t), ssin + ANGLES(t), \
                        (size_t)slots[t], k_pool, v_pool, q_out + (size_t)(t) * Hq * D, half)
    if (T < 32) { /* a parallel region would cost more than it saves */
        for (int t = 0; t < T; t++) ROW(t);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int t = 0; t < T; t++) ROW(t);
#undef ROW
#undef ANGLES
}
