/* Decode attention read straight from the paged KV cache (AVX2 + FMA, float32).
 *
 * One new token per sequence attends to its whole context. Gathering each context into a padded
 * tensor first (what a generic attention call needs) moves every key and value twice and, at 16
 * sequences, cost as much as the model's matrix products; here each query head walks its
 * sequence's block table in place: scores for every position (four keys per pass over q), an
 * exact softmax over them, then the weighted sum of values with 64 output dimensions held in
 * registers. Nothing is copied and no padding is computed.
 *
 * Each (sequence, KV head) is one task, computed in the same order whatever else is in the batch:
 * a sequence gets the same result alone or with others. GQA: query head i reads KV head
 * i / (query heads per KV head), as Hugging Face's repeat_kv does; the heads of one group run in
 * the same task, so their keys and values are still in cache for the second and third head.
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

/* s[j] = scale * q . k[j] for the n keys at pool elements k, k + stride, ...: four keys at a time
 * share each load of q, two accumulators per key keep the multiply-adds independent. */
static void scores(const float *q, const void *pool, size_t k, size_t stride, int n, int D, float scale, float *s,
                   int half) {
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const size_t k0 = k + j * stride, k1 = k0 + stride, k2 = k1 + stride, k3 = k2 + stride;
        __m256 a[8];
        for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
        int i = 0;
        for (; i + 16 <= D; i += 16) {
            const __m256 qa = _mm256_loadu_ps(q + i), qb = _mm256_loadu_ps(q + i + 8);
            a[0] = _mm256_fmadd_ps(qa, load_kv(pool, k0 + i, half), a[0]);
            a[1] = _mm256_fmadd_ps(qb, load_kv(pool, k0 + i + 8, half), a[1]);
            a[2] = _mm256_fmadd_ps(qa, load_kv(pool, k1 + i, half), a[2]);
            a[3] = _mm256_fmadd_ps(qb, load_kv(pool, k1 + i + 8, half), a[3]);
            a[4] = _mm256_fmadd_ps(qa, load_kv(pool, k2 + i, half), a[4]);
            a[5] = _mm256_fmadd_ps(qb, load_kv(pool, k2 + i + 8, half), a[5]);
            a[6] = _mm256_fmadd_ps(qa, load_kv(pool, k3 + i, half), a[6]);
            a[7] = _mm256_fmadd_ps(qb, load_kv(pool, k3 + i + 8, half), a[7]);
        }
        if (i < D) { /* D = 16 m + 8 */
            const __m256 qa = _mm256_loadu_ps(q + i);
            a[0] = _mm256_fmadd_ps(qa, load_kv(pool, k0 + i, half), a[0]);
            a[2] = _mm256_fmadd_ps(qa, load_kv(pool, k1 + i, half), a[2]);
            a[4] = _mm256_fmadd_ps(qa, load_kv(pool, k2 + i, half), a[4]);
            a[6] = _mm256_fmadd_ps(qa, load_kv(pool, k3 + i, half), a[6]);
        }
        const __m128 four = hsum4(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]), _mm256_add_ps(a[4], a[5]),
                                  _mm256_add_ps(a[6], a[7]));
        _mm_storeu_ps(s + j, _mm_mul_ps(four, _mm_set1_ps(scale)));
    }
    for (; j < n; j++) {
        const size_t kj = k + j * stride;
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load_kv(pool, kj + i, half), acc);
        s[j] = scale * hsum(acc);
    }
}

/* out[0 .. D) = sum over the context of p[j] * v[j] / l, 64 dimensions at a time in registers. */
static void weighted_values(const float *p, const int64_t *table, int64_t L, int block, const void *pool, size_t v,
                            size_t stride, int D, float inv_l, float *out, int half) {
    for (int c = 0; c < D; c += 64) {
        const int nv = (D - c) / 8 < 8 ? (D - c) / 8 : 8;
        __m256 acc[8];
        for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t start = 0; start < L; start += block) {
            const int n = (int)(L - start < block ? L - start : block);
            const size_t vb = v + (size_t)table[start / block] * block * stride + c;
            for (int j = 0; j < n; j++) {
                const __m256 pj = _mm256_set1_ps(p[start + j]);
                const size_t vj = vb + j * stride;
#pragma GCC unroll 8
                for (int r = 0; r < 8; r++)
                    if (r < nv) acc[r] = _mm256_fmadd_ps(pj, load_kv(pool, vj + 8 * r, half), acc[r]);
            }
        }
        const __m256 inv = _mm256_set1_ps(inv_l);
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++)
            if (r < nv) _mm256_storeu_ps(out + c + 8 * r, _mm256_mul_ps(acc[r], inv));
    }
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
        /* the softmax weights of one head's context: per thread, reused */
        float *p = (float *)malloc(((size_t)longest + 8) * sizeof(float));
        if (!p) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < B * Hkv; task++) {
            if (!p) continue;
            const int b = task / Hkv, h = task % Hkv;
            const int64_t L = lengths[b], *table = tables + (size_t)b * width;
            const size_t stride = (size_t)Hkv * D; /* from one slot's K (or V) of head h to the next */
            for (int g = 0; g < group; g++) {
                const int hq = h * group + g;
                const float *qg = q + ((size_t)b * Hq + hq) * D;
                for (int64_t start = 0; start < L; start += block) {
                    const int n = (int)(L - start < block ? L - start : block);
                    scores(qg, k, (size_t)table[start / block] * block * stride + (size_t)h * D, stride, n, D, scale,
                           p + start, half);
                }
                /* softmax: subtract the largest score, exponentiate eight at a time */
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
                weighted_values(p, table, L, block, v, (size_t)h * D, stride, D, l > 0.0f ? 1.0f / l : 0.0f,
                                out + ((size_t)b * Hq + hq) * D, half);
            }
        }
        free(p);
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
