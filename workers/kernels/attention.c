/* Decode attention read straight from the paged KV cache (AVX2 + FMA, float32).
 *
 * One new token per sequence attends to its whole context. Gathering each context into a padded
 * tensor first (what a generic attention call needs) moves every key and value twice and, at 16
 * sequences, cost as much as the model's matrix products; here the query heads walk their
 * sequence's block table in place: scores for every position, an exact softmax over them, then the
 * weighted sum of values. Nothing is copied and no padding is computed.
 *
 * Each (sequence, KV head) is one task, computed in the same order whatever else is in the batch:
 * a sequence gets the same result alone or with others. GQA: query head i reads KV head
 * i / (query heads per KV head), as Hugging Face's repeat_kv does; up to GQ heads of one group are
 * computed together, so each key and value is loaded (and converted from float16) once for all of
 * them rather than once per head.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* The four sums of a, b, c, d's lanes, in that order. */
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

#define GQ 4 /* query heads of one KV group computed together: each key and value is loaded once for all */

/* s[g][j] = scale * q[g] . k[j] for G (a constant after inlining, <= GQ) query heads and the n keys
 * at pool elements k, k + stride, ...: two keys at a time, each eight dimensions of a key loaded
 * (and converted from float16) once for all G heads. */
static inline __attribute__((always_inline)) void scores(const int G, const float *const *q, const void *pool,
                                                         size_t k, size_t stride, int n, int D, float scale,
                                                         float *const *s, int64_t at, int half) {
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

/* out[g][0 .. D) = inv_l[g] * sum over the context of p[g][j] * v[j] for G heads, 16 dimensions at
 * a time: each value vector is loaded once for all G heads. */
static inline __attribute__((always_inline)) void weighted_values(const int G, const float *const *p,
                                                                  const int64_t *table, int64_t L, int block,
                                                                  const void *pool, size_t v, size_t stride, int D,
                                                                  const float *inv_l, float *const *out, int half) {
    for (int c = 0; c < D; c += 16) {
        const int two = D - c >= 16;
        __m256 acc[GQ][2];
        for (int g = 0; g < GQ; g++) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
        for (int64_t start = 0; start < L; start += block) {
            const int n = (int)(L - start < block ? L - start : block);
            const size_t vb = v + (size_t)table[start / block] * block * stride + c;
            for (int j = 0; j < n; j++) {
                const size_t vj = vb + j * stride;
                const __m256 v0 = load_kv(pool, vj, half), v1 = two ? load_kv(pool, vj + 8, half) : v0;
                for (int g = 0; g < G; g++) {
                    const __m256 pg = _mm256_set1_ps(p[g][start + j]);
                    acc[g][0] = _mm256_fmadd_ps(pg, v0, acc[g][0]);
                    acc[g][1] = _mm256_fmadd_ps(pg, v1, acc[g][1]);
                }
            }
        }
        for (int g = 0; g < G; g++) {
            const __m256 inv = _mm256_set1_ps(inv_l[g]);
            _mm256_storeu_ps(out[g] + c, _mm256_mul_ps(acc[g][0], inv));
            if (two) _mm256_storeu_ps(out[g] + c + 8, _mm256_mul_ps(acc[g][1], inv));
        }
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

/* G query heads (q[g], out[g]) against one KV head (offset kv in the pools) of a sequence whose
 * context is L positions in blocks `table`; p[g]: room for L + 8 weights each. */
static inline __attribute__((always_inline)) void heads(const int G, const float *const *q, const void *k,
                                                        const void *v, size_t kv, size_t stride, const int64_t *table,
                                                        int64_t L, int block, int D, float scale, float *const *p,
                                                        float *const *out, int half) {
    for (int64_t start = 0; start < L; start += block) {
        const int n = (int)(L - start < block ? L - start : block);
        scores(G, q, k, (size_t)table[start / block] * block * stride + kv, stride, n, D, scale, p, start, half);
    }
    float inv_l[GQ];
    for (int g = 0; g < G; g++) inv_l[g] = softmax(p[g], L);
    weighted_values(G, (const float *const *)p, table, L, block, v, kv, stride, D, inv_l, out, half);
}

/* out[b, h] = softmax(scale * q[b, h] . K[b]) V[b] for query head h of sequence b, whose context is
 * positions 0 .. lengths[b] - 1 held in blocks tables[b, 0 ..] of the cache.
 *   q, out: [B, Hq, D]; k, v: [slots, Hkv, D] (slot = block * block + offset), float32, or float16
 *   when half; tables: [B, width].
 * Returns -1 (nothing computed) for shapes it does not handle; the caller then uses PyTorch. */
int cortex_paged_attention(const float *q, const void *k, const void *v, const int64_t *tables, int width,
                           const int64_t *lengths, int B, int Hq, int Hkv, int D, int block, float scale, float *out,
                           int half) {
    const int group = Hq / Hkv;
    if (D % 8 || Hq % Hkv) return -1;
    int64_t longest = 0;
    for (int b = 0; b < B; b++) longest = lengths[b] > longest ? lengths[b] : longest;
    int failed = 0;
#pragma omp parallel if (B * Hkv > 1)
    {
        /* the softmax weights of GQ heads' contexts: per thread, reused */
        const size_t room = (size_t)longest + 8;
        float *buf = (float *)malloc(GQ * room * sizeof(float));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        float *p[GQ];
        for (int g = 0; g < GQ; g++) p[g] = buf ? buf + g * room : NULL;
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < B * Hkv; task++) {
            if (!buf) continue;
            const int b = task / Hkv, h = task % Hkv;
            const int64_t L = lengths[b], *table = tables + (size_t)b * width;
            const size_t stride = (size_t)Hkv * D; /* from one slot's K (or V) of head h to the next */
            for (int g0 = 0; g0 < group; g0 += GQ) {
                const int gn = group - g0 < GQ ? group - g0 : GQ;
                const float *qs[GQ];
                float *os[GQ];
                for (int g = 0; g < gn; g++) {
                    const size_t row = ((size_t)b * Hq + h * group + g0 + g) * D;
                    qs[g] = q + row, os[g] = out + row;
                }
#define HEADS(G) heads(G, qs, k, v, (size_t)h * D, stride, table, L, block, D, scale, p, os, half)
                switch (gn) {
                case 4: HEADS(4); break;
                case 3: HEADS(3); break;
                case 2: HEADS(2); break;
                default: HEADS(1);
                }
#undef HEADS
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* RoPE and the KV write of one step, in one pass over the projections.
 *   qkv: [T, Hq + 2 Hkv, D], the step's q, k and v heads; cos, ssin: [T, D] per row, ssin the sin
 *   with the first half negated (rotate_half's sign folded in); slots: [T].
 * Writes rotated q to q_out [T, Hq, D] and rotated k and plain v to the pool's slot of each row
 * (float32 pools, or float16 when half): x * cos + roll(x, D / 2) * ssin, as workers/arch/llama.py's
 * apply_rotary. D must be a multiple of 16 (the caller checks). */
void cortex_rope_store(const float *qkv, int T, int Hq, int Hkv, int D, const float *cos, const float *ssin,
                       const int64_t *slots, void *k_pool, void *v_pool, float *q_out, int half) {
    const int mid = D / 2, heads = Hq + 2 * Hkv;
#pragma omp parallel for schedule(static) if (T >= 32)
    for (int t = 0; t < T; t++) {
        const float *row = qkv + (size_t)t * heads * D, *c = cos + (size_t)t * D, *s = ssin + (size_t)t * D;
        const size_t slot = (size_t)slots[t];
        for (int h = 0; h < Hq + Hkv; h++) {
            const float *x = row + (size_t)h * D;
            for (int i = 0; i < D; i += 8) {
                const float *partner = x + (i < mid ? i + mid : i - mid);
                const __m256 xc = _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(c + i));
                const __m256 r = _mm256_fmadd_ps(_mm256_loadu_ps(partner), _mm256_loadu_ps(s + i), xc);
                if (h < Hq)
                    _mm256_storeu_ps(q_out + ((size_t)t * Hq + h) * D + i, r);
                else
                    store_kv(k_pool, (slot * Hkv + h - Hq) * D + i, r, half);
            }
        }
        for (int h = 0; h < Hkv; h++) {
            const float *x = row + (size_t)(Hq + Hkv + h) * D;
            for (int i = 0; i < D; i += 8) store_kv(v_pool, (slot * Hkv + h) * D + i, _mm256_loadu_ps(x + i), half);
        }
    }
}
