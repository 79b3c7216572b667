/* Block-quantized matrix products for the CPU (AVX2 + FMA): y[M, N] = x[M, K] @ w[N, K]^T.
 *
 * Weights stay in llama.cpp's block formats, 32 inputs per block:
 *   Q4: 16 bytes of 4-bit values (byte j holds element j in its low nibble, element j + 16 in its
 *       high nibble), a scale d and an offset m: w = d * q + m (Q4_0 files: m = -8 d).
 *   Q8: 32 signed bytes and a scale d: w = d * q.
 * Activations are quantized on the fly per row and block of 32 to int16 (scale amax / 32767: a
 * relative error of 1.5e-5, finer than bfloat16; int8 as llama.cpp does measurably moved small
 * models' answers), so every block product is an exact integer dot product (vpmaddwd) followed
 * by one float multiply-add. Each output row's sum is accumulated in the same order whatever the
 * number of rows, so a sequence gets the same result alone or in a batch.
 *
 * Threads: OpenMP, the runtime PyTorch already loaded (same soname), so both share one pool.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define QK 32
#define ROWS 4 /* activation rows sharing one unpacked weight block */

static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Per row and block of 32: int16 values q = round(x * 32767 / amax) (to nearest even, the CPU's
 * default rounding mode), scale d = amax / 32767 and d * sum(q). */
static void quantize_rows(const float *x, int M, int K, int16_t *q, float *d, float *s) {
    const int nb = K / QK;
    const __m256 sign = _mm256_set1_ps(-0.0f);
#pragma omp parallel for schedule(static) if (M > 8)
    for (int r = 0; r < M; r++) {
        for (int b = 0; b < nb; b++) {
            const float *xb = x + (size_t)r * K + (size_t)b * QK;
            __m256 v[4], amax = _mm256_setzero_ps();
            for (int j = 0; j < 4; j++) {
                v[j] = _mm256_loadu_ps(xb + 8 * j);
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
            }
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            const float am = _mm_cvtss_f32(m4);
            const float dd = am / 32767.0f, id = am > 0.0f ? 32767.0f / am : 0.0f;
            const __m256 mul = _mm256_set1_ps(id);
            __m256i i32[4];
            for (int j = 0; j < 4; j++) i32[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], mul));
            /* packs work per 128-bit lane: put the 64-bit quarters back in element order */
            const __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(i32[0], i32[1]), 0xD8);
            const __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(i32[2], i32[3]), 0xD8);
            int16_t *qb = q + (size_t)r * K + (size_t)b * QK;
            _mm256_storeu_si256((__m256i *)qb, lo);
            _mm256_storeu_si256((__m256i *)(qb + 16), hi);
            const __m256i sum32 = _mm256_add_epi32(_mm256_add_epi32(i32[0], i32[1]), _mm256_add_epi32(i32[2], i32[3]));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
            d[(size_t)r * nb + b] = dd;
            s[(size_t)r * nb + b] = dd * (float)_mm_cvtsi128_si32(s4);
        }
    }
}

/* Sum of the 32 products of a weight block (two halves of 16 int16) and an activation block. */
static inline __m256 dot16(__m256i w0, __m256i w1, const int16_t *x) {
    const __m256i p0 = _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)x));
    const __m256i p1 = _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(x + 16)));
    return _mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1));
}

typedef struct {
    int16_t *q;
    float *d, *s;
} act_t;

static int act_alloc(act_t *a, const float *x, int M, int K) {
    const size_t nb = (size_t)M * (K / QK);
    a->q = (int16_t *)malloc((size_t)M * K * sizeof(int16_t));
    a->d = (float *)malloc(nb * sizeof(float));
    a->s = (float *)malloc(nb * sizeof(float));
    if (!a->q || !a->d || !a->s) return -1;
    quantize_rows(x, M, K, a->q, a->d, a->s);
    return 0;
}

static void act_free(act_t *a) {
    free(a->q);
    free(a->d);
    free(a->s);
}

/* One weight row n against R activation rows (R a constant after inlining: accumulators stay in
 * registers). */
static inline __attribute__((always_inline)) void q4_tile(const int R, const act_t *a, int r0, int nb, int N, int n,
                                                          const uint8_t *wq, const float *dn, const float *mn,
                                                          float *y) {
    __m256 acc[ROWS];
    float off[ROWS];
    for (int t = 0; t < R; t++) {
        acc[t] = _mm256_setzero_ps();
        off[t] = 0.0f;
    }
    const int16_t *xq = a->q + (size_t)r0 * nb * QK;
    const float *xd = a->d + (size_t)r0 * nb, *xs = a->s + (size_t)r0 * nb;
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        /* byte j: element j in the low nibble, element j + 16 in the high one */
        const __m128i bytes = _mm_loadu_si128((const __m128i *)(wq + (size_t)b * (QK / 2)));
        const __m256i w0 = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, mask));
        const __m256i w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask));
        for (int t = 0; t < R; t++) {
            const __m256 p = dot16(w0, w1, xq + ((size_t)t * nb + b) * QK);
            acc[t] = _mm256_fmadd_ps(p, _mm256_set1_ps(dn[b] * xd[t * nb + b]), acc[t]);
            off[t] = fmaf(mn[b], xs[t * nb + b], off[t]);
        }
    }
    for (int t = 0; t < R; t++) y[(size_t)(r0 + t) * N + n] = hsum(acc[t]) + off[t];
}

static inline __attribute__((always_inline)) void q8_tile(const int R, const act_t *a, int r0, int nb, int N, int n,
                                                          const int8_t *wq, const float *dn, float *y) {
    __m256 acc[ROWS];
    for (int t = 0; t < R; t++) acc[t] = _mm256_setzero_ps();
    const int16_t *xq = a->q + (size_t)r0 * nb * QK;
    const float *xd = a->d + (size_t)r0 * nb;
    for (int b = 0; b < nb; b++) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wq + (size_t)b * QK)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wq + (size_t)b * QK + 16)));
        for (int t = 0; t < R; t++) {
            const __m256 p = dot16(w0, w1, xq + ((size_t)t * nb + b) * QK);
            acc[t] = _mm256_fmadd_ps(p, _mm256_set1_ps(dn[b] * xd[t * nb + b]), acc[t]);
        }
    }
    for (int t = 0; t < R; t++) y[(size_t)(r0 + t) * N + n] = hsum(acc[t]);
}

#define BY_ROWS(rows, call) \
    switch ((rows) < ROWS ? (rows) : ROWS) { \
    case 4: call(4); break; \
    case 3: call(3); break; \
    case 2: call(2); break; \
    default: call(1);       \
    }

/* y[M, N] = x[M, K] @ w[N, K]^T for either block format; wm is NULL for Q8. */
static int matmul(const float *x, int M, int K, const void *qs, const float *wd, const float *wm, int N, float *y) {
    act_t a;
    if (act_alloc(&a, x, M, K)) {
        act_free(&a);
        return -1;
    }
    const int nb = K / QK;
    /* tiles of rows outside, weight rows inside: a tile's activations stay in L1 over all of N */
#pragma omp parallel
    for (int r0 = 0; r0 < M; r0 += ROWS) {
#pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const float *dn = wd + (size_t)n * nb;
            if (wm) {
                const uint8_t *wq = (const uint8_t *)qs + (size_t)n * nb * (QK / 2);
                const float *mn = wm + (size_t)n * nb;
#define Q4(R) q4_tile(R, &a, r0, nb, N, n, wq, dn, mn, y)
                BY_ROWS(M - r0, Q4)
#undef Q4
            } else {
                const int8_t *wq = (const int8_t *)qs + (size_t)n * K;
#define Q8(R) q8_tile(R, &a, r0, nb, N, n, wq, dn, y)
                BY_ROWS(M - r0, Q8)
#undef Q8
            }
        }
    }
    act_free(&a);
    return 0;
}

/* Q4 weights: qs [N, K/32, 16] bytes, d and m [N, K/32]. */
int cortex_q4_matmul(const float *x, int M, int K, const uint8_t *qs, const float *wd, const float *wm, int N,
                     float *y) {
    return matmul(x, M, K, qs, wd, wm, N, y);
}

/* Q8 weights: qs [N, K] int8, d [N, K/32]. */
int cortex_q8_matmul(const float *x, int M, int K, const int8_t *qs, const float *wd, int N, float *y) {
    return matmul(x, M, K, qs, wd, NULL, N, y);
}
