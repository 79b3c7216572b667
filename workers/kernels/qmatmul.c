/* Block-quantized matrix products for the CPU (AVX2 + FMA): y[M, N] = x[M, K] @ w[N, K]^T.
 *
 * Weights stay in llama.cpp's block formats, 32 inputs per block:
 *   Q4: 16 bytes of 4-bit values (byte j holds element j in its low nibble, element j + 16 in its
 *       high nibble), a scale d and an offset m: w = d * q + m (Q4_0 files: m = -8 d).
 *   Q8: 32 signed bytes and a scale d: w = d * q.
 * Activations are quantized on the fly per row and block of 32 to int16 (scale amax / 32767: a
 * relative error of 1.5e-5, finer than bfloat16; int8 as llama.cpp does measurably moved small
 * models' answers), so every block product is an exact integer dot product (vpmaddwd).
 *
 * Blocks are taken two at a time: each 256-bit vector holds 8 inputs of one block in its low half
 * and the same 8 of the next block in its high half, so one conversion to float and one
 * multiply-add by a vector of two block scales finish two blocks (the activations are stored in
 * that order when quantized; the weights unpack into it for free). A weight row is unpacked once
 * per tile of ROWS activation rows; its block of rows stays in L1 while every tile of the step
 * passes over it, so each weight byte comes from memory once per step (up to ROW_CHUNK rows).
 * Each output row's sum is accumulated in the same order whatever the number of rows, so a
 * sequence gets the same result alone or in a batch.
 *
 * Threads: OpenMP, the runtime PyTorch already loaded (same soname), so both share one pool.
 */
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define QK 32
#define ROWS 4        /* activation rows sharing one unpacked weight pair (registers) */
#define ROW_CHUNK 64  /* activation rows per pass over the weights (their int16 copies stay in L2) */
#define BLOCK_N 16    /* weight rows per block of the output (see matmul) */

/* Activations of a step, quantized, in pair order. Per row and pair of blocks (b0, b1):
 *   q:   64 int16, four vectors [b0 x[8c .. 8c+7] | b1 x[8c .. 8c+7]] for c = 0..3;
 *   d:   8 floats [d0 x4 | d1 x4], the blocks' scales amax / 32767.
 * An odd last block pairs with zeros. Per row and block, sums[b] = d * sum(q): Q4's offsets m
 * contribute sum_b m[b] * sums[b] to a product, one short dot product per row at the end. */
typedef struct {
    int16_t *q;
    float *d, *sums;
    int pairs, sums_stride;
} act_t;

static void quantize_row(const float *x, int nb, int16_t *q, float *d, float *sums) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < nb; b++) {
        const float *xb = x + (size_t)b * QK;
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
        const int pair = b / 2, half = b % 2;
        __m256i sum32 = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            /* rounds to nearest even (the CPU's default mode); |q| <= 32767 */
            const __m256i i32 = _mm256_cvtps_epi32(_mm256_mul_ps(v[c], mul));
            sum32 = _mm256_add_epi32(sum32, i32);
            const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
            _mm_storeu_si128((__m128i *)(q + (size_t)pair * 64 + c * 16 + half * 8), i16);
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum32), _mm256_extracti128_si256(sum32, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        sums[b] = dd * (float)_mm_cvtsi128_si32(s4);
        for (int i = 0; i < 4; i++) d[(size_t)pair * 8 + half * 4 + i] = dd;
    }
    if (nb % 2) { /* the missing partner of the last block */
        const int pair = nb / 2;
        for (int c = 0; c < 4; c++) _mm_storeu_si128((__m128i *)(q + (size_t)pair * 64 + c * 16 + 8), _mm_setzero_si128());
        for (int i = 4; i < 8; i++) d[(size_t)pair * 8 + i] = 0.0f;
    }
}

static int act_alloc(act_t *a, const float *x, int M, int K) {
    const int nb = K / QK;
    a->pairs = (nb + 1) / 2;
    const size_t np = (size_t)M * a->pairs;
    a->q = (int16_t *)malloc(np * 64 * sizeof(int16_t));
    a->d = (float *)malloc(np * 8 * sizeof(float));
    a->sums_stride = (nb + 7) & ~7;
    a->sums = (float *)calloc((size_t)M * a->sums_stride, sizeof(float));
    if (!a->q || !a->d || !a->sums) return -1;
#pragma omp parallel for schedule(static) if (M > 8)
    for (int r = 0; r < M; r++)
        quantize_row(x + (size_t)r * K, nb, a->q + (size_t)r * a->pairs * 64, a->d + (size_t)r * a->pairs * 8,
                     a->sums + (size_t)r * a->sums_stride);
    return 0;
}

static void act_free(act_t *a) {
    free(a->q);
    free(a->d);
    free(a->sums);
}

/* [lo x4 | hi x4] */
static inline __m256 pair_scale(float lo, float hi) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(lo)), _mm_set1_ps(hi), 1);
}

/* Unpack a pair of weight blocks (the second absent when !both) into the activations' order. */
static inline void q4_pair(const uint8_t *wb, int both, __m256i w[4]) {
    const __m256i bytes = both ? _mm256_loadu_si256((const __m256i *)wb)
                               : _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128((const __m128i *)wb), 0);
    const __m256i mask = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    const __m256i lo = _mm256_and_si256(bytes, mask), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
    w[0] = _mm256_unpacklo_epi8(lo, zero); /* elements 0-7 of each block */
    w[1] = _mm256_unpackhi_epi8(lo, zero); /* 8-15 */
    w[2] = _mm256_unpacklo_epi8(hi, zero); /* 16-23 */
    w[3] = _mm256_unpackhi_epi8(hi, zero); /* 24-31 */
}

static inline void q8_pair(const int8_t *wb, int both, __m256i w[4]) {
    const __m128i z = _mm_setzero_si128();
    for (int h = 0; h < 2; h++) { /* h: elements 0-15, then 16-31 */
        const __m128i b0 = _mm_loadu_si128((const __m128i *)(wb + 16 * h));
        const __m128i b1 = both ? _mm_loadu_si128((const __m128i *)(wb + QK + 16 * h)) : z;
        const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(b0), b1, 1);
        /* each byte paired with itself, then shifted down: sign-extended int16 */
        w[2 * h] = _mm256_srai_epi16(_mm256_unpacklo_epi8(v, v), 8);
        w[2 * h + 1] = _mm256_srai_epi16(_mm256_unpackhi_epi8(v, v), 8);
    }
}

/* One weight row n against R activation rows r0 .. r0 + R - 1 (R a constant after inlining:
 * accumulators stay in registers). wm NULL: Q8, else Q4. */
static inline __attribute__((always_inline)) void tile(const int R, const act_t *a, int r0, int nb, const void *wq,
                                                       const float *dn, const float *mn, float *y, int N, int n) {
    __m256 acc[ROWS];
    for (int t = 0; t < R; t++) acc[t] = _mm256_setzero_ps();
    const int P = a->pairs;
    for (int p = 0; p < P; p++) {
        const int both = 2 * p + 1 < nb;
        __m256i w[4];
        if (mn)
            q4_pair((const uint8_t *)wq + (size_t)p * QK, both, w);
        else
            q8_pair((const int8_t *)wq + (size_t)p * 2 * QK, both, w);
        const __m256 wd = pair_scale(dn[2 * p], both ? dn[2 * p + 1] : 0.0f);
        for (int t = 0; t < R; t++) {
            const size_t at = (size_t)(r0 + t) * P + p;
            const __m256i *xq = (const __m256i *)(a->q + at * 64);
            const __m256i s01 = _mm256_add_epi32(_mm256_madd_epi16(w[0], _mm256_loadu_si256(xq)),
                                                 _mm256_madd_epi16(w[1], _mm256_loadu_si256(xq + 1)));
            const __m256i s23 = _mm256_add_epi32(_mm256_madd_epi16(w[2], _mm256_loadu_si256(xq + 2)),
                                                 _mm256_madd_epi16(w[3], _mm256_loadu_si256(xq + 3)));
            const __m256 scale = _mm256_mul_ps(wd, _mm256_loadu_ps(a->d + at * 8));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s01, s23)), scale, acc[t]);
        }
    }
    for (int t = 0; t < R; t++) {
        float off = 0.0f;
        if (mn) { /* sum_b m[b] * sums[b], eight blocks at a time; the row's tail masked off */
            const float *st = a->sums + (size_t)(r0 + t) * a->sums_stride;
            __m256 o = _mm256_setzero_ps();
            int b = 0;
            for (; b + 8 <= nb; b += 8) o = _mm256_fmadd_ps(_mm256_loadu_ps(mn + b), _mm256_loadu_ps(st + b), o);
            if (b < nb) {
                const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(nb - b), lanes);
                o = _mm256_fmadd_ps(_mm256_maskload_ps(mn + b, mask), _mm256_loadu_ps(st + b), o);
            }
            off = hsum(o);
        }
        y[(size_t)(r0 + t) * N + n] = hsum(acc[t]) + off;
    }
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
    const size_t row_bytes = wm ? (size_t)nb * QK / 2 : (size_t)K;
    /* Blocks of BLOCK_N weight rows and tiles of ROWS activation rows: both stay in L1 while the
     * tiles pass over the block (an activation row's int16 copy is 2 K bytes: at K = 1536 the
     * whole step's no longer fits and was re-read from L2 for every weight row). */
#pragma omp parallel
    for (int c0 = 0; c0 < M; c0 += ROW_CHUNK) {
        const int c1 = c0 + ROW_CHUNK < M ? c0 + ROW_CHUNK : M;
#pragma omp for schedule(static)
        for (int n0 = 0; n0 < N; n0 += BLOCK_N) {
            const int n1 = n0 + BLOCK_N < N ? n0 + BLOCK_N : N;
            for (int r0 = c0; r0 < c1; r0 += ROWS)
                for (int n = n0; n < n1; n++) {
                    const void *wq = (const uint8_t *)qs + (size_t)n * row_bytes;
                    const float *dn = wd + (size_t)n * nb, *mn = wm ? wm + (size_t)n * nb : NULL;
#define TILE(R) tile(R, &a, r0, nb, wq, dn, mn, y, N, n)
                    BY_ROWS(c1 - r0, TILE)
#undef TILE
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
