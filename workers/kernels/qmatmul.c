/* Block-quantized matrix products for the CPU (AVX2 + FMA; AVX-512 VNNI where built for it):
 * y[M, N] = x[M, K] @ w[N, K]^T.
 *
 * Weights stay in llama.cpp's block formats, 32 inputs per block:
 *   Q4: 16 bytes of 4-bit values (byte j holds element j in its low nibble, element j + 16 in its
 *       high nibble), a scale d and an offset m: w = d * q + m (Q4_0 files: m = -8 d).
 *   Q8: 32 signed bytes and a scale d: w = d * q (pairs of blocks interleaved by eights, see q8_pair).
 * Scales and offsets are float16, as the file stores them (converted with F16C as they are read): at
 * one row every weight byte crosses the memory bus once per token, and float32 ones made a Q4 block
 * 24 bytes instead of 20.
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
 * Built for AVX-512 VNNI (workers/native.py's avx512vnni path), a block product's multiply-adds
 * and the adds that join them are one vpdpwssd each (on 256-bit vectors, EVEX-encoded: same
 * layout, same exact int32 sums, so the same bits as the AVX2 build). On an AMD EPYC (Zen 4 by
 * its flags) the whole model's products take 7-9% less time at 16-256 rows, the same at one row
 * (memory-bound there).
 * Four blocks per 512-bit vector (one per 128-bit lane) were tried and were no faster: Zen 4 runs
 * a 512-bit operation as two 256-bit halves, and the per-group scale broadcast and the 16-lane
 * final sum ate what the halved instruction count saved (within a few percent of the 256-bit
 * kernel; 10-30% slower with two weight rows a tile). So were tiles of two weight rows on 256-bit
 * vectors with the 32 registers (2% faster at 64-256 rows, 10-35% slower at 1-16).
 *
 * Threads: OpenMP, the runtime PyTorch already loaded (same soname), so both share one pool.
 */
#include <stdint.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

#define QK 32
#define ROWS 4        /* activation rows sharing one unpacked weight pair (registers; 6 made one-row products 10% slower) */
#define ROW_CHUNK 64  /* activation rows per pass over the weights (their int16 copies stay in L2) */
#define BLOCK_N 16    /* weight rows per block of the output (see matmul); Q4's offsets are stored by it */
_Static_assert(BLOCK_N == 16, "offsets() computes a block as two groups of eight");

/* Activations of a step, quantized, in pair order (act_t, kernels.h). Per row and pair of blocks (b0, b1):
 *   q:   64 int16, four vectors [b0 x[8c .. 8c+7] | b1 x[8c .. 8c+7]] for c = 0..3;
 *   d:   8 floats [d0 x4 | d1 x4], the blocks' scales amax / 32767.
 * An odd last block pairs with zeros. Per row and block, sums[b] = d * sum(q): Q4's offsets m
 * contribute sum_b m[b] * sums[b] to a product; `offsets` computes them for eight outputs at a time
 * from the offsets stored transposed, before the integer products add to them. */

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

/* Buffers for M rows of up to K inputs (quantized by act_quantize, which sets the shape). */
int cortex_act_alloc(act_t *a, int M, int K) {
    const size_t np = (size_t)M * ((K / QK + 1) / 2);
    /* cache-line aligned: with malloc's 16-byte alignment up to half of the 32-byte loads straddled
     * two lines, and the products are bound by these loads (9-14% at 16 rows) */
    a->q = (int16_t *)aligned_alloc(64, np * 64 * sizeof(int16_t) + 64);
    a->d = (float *)aligned_alloc(64, (np * 8 * sizeof(float) + 63) & ~(size_t)63);
    a->sums = (float *)malloc((size_t)M * (K / QK) * sizeof(float) + 1);
    return a->q && a->d && a->sums ? 0 : -1;
}

static void quantize_rows(act_t *a, const float *x, int r0, int r1, int K) {
    for (int r = r0; r < r1; r++)
        quantize_row(x + (size_t)r * K, a->blocks, a->q + (size_t)r * a->pairs * 64, a->d + (size_t)r * a->pairs * 8,
                     a->sums + (size_t)r * a->blocks);
}

/* x [M, K] into a (allocated for at least M rows of K): one thread's work (the whole-step call
 * quantizes each product's few rows on every thread rather than wait on one). */
void cortex_act_quantize(act_t *a, const float *x, int M, int K) {
    a->blocks = K / QK;
    a->pairs = (a->blocks + 1) / 2;
    quantize_rows(a, x, 0, M, K);
}

static int act_alloc(act_t *a, const float *x, int M, int K) {
    if (cortex_act_alloc(a, M, K)) return -1;
    if (M <= 8) {
        cortex_act_quantize(a, x, M, K);
        return 0;
    }
    a->blocks = K / QK;
    a->pairs = (a->blocks + 1) / 2;
#pragma omp parallel for schedule(static)
    for (int r = 0; r < M; r++) quantize_rows(a, x, r, r + 1, K);
    return 0;
}

void cortex_act_free(act_t *a) {
    free(a->q);
    free(a->d);
    free(a->sums);
}

/* [lo x4 | hi x4] */
static inline __m256 pair_scale(float lo, float hi) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(lo)), _mm_set1_ps(hi), 1);
}

/* The float16 scales of blocks 2p and 2p + 1 (dn: a row's scales) as pair_scale lays them out: one
 * load, one conversion and one permute, where two scalar conversions, two broadcasts and an insert
 * (9 of the 27 instructions of a pair at one activation row, where a thread's product is bound by
 * the shuffle ports, not memory) made one-row products 15-25% slower. The same values: the
 * conversions are exact. */
static inline __m256 pair_scales(const uint16_t *dn, int p) {
    int32_t two;
    memcpy(&two, dn + 2 * p, sizeof two);
    const __m128 d = _mm_cvtph_ps(_mm_cvtsi32_si128(two)); /* [d0, d1, 0, 0] */
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d), _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
}

/* Unpack a pair of weight blocks (the second absent when !both) into the activations' order. */
static inline __attribute__((always_inline)) void q4_pair(const uint8_t *wb, int both, __m256i w[4]) {
    const __m256i bytes = both ? _mm256_loadu_si256((const __m256i *)wb)
                               : _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128((const __m128i *)wb), 0);
    const __m256i mask = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    const __m256i lo = _mm256_and_si256(bytes, mask), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
    w[0] = _mm256_unpacklo_epi8(lo, zero); /* elements 0-7 of each block */
    w[1] = _mm256_unpackhi_epi8(lo, zero); /* 8-15 */
    w[2] = _mm256_unpacklo_epi8(hi, zero); /* 16-23 */
    w[3] = _mm256_unpackhi_epi8(hi, zero); /* 24-31 */
}

/* Q8 rows are stored with each full pair of blocks interleaved by eights, [b0 0-7, b1 0-7, b0 8-15,
 * b1 8-15, ...] (QuantLinear.int8), so one sign-extending load gives a vector in the activations'
 * order; an odd last block keeps its natural order. */
static inline __attribute__((always_inline)) void q8_pair(const int8_t *wb, int both, __m256i w[4]) {
    if (both) {
        for (int c = 0; c < 4; c++) w[c] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wb + 16 * c)));
        return;
    }
    for (int c = 0; c < 4; c++) /* elements 8c .. 8c + 7 of the lone block, zeros for its partner */
        w[c] = _mm256_inserti128_si256(_mm256_setzero_si256(),
                                       _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(wb + 8 * c))), 0);
}

/* Weight pair p of a row in either format (q8 a constant after inlining). */
static inline __attribute__((always_inline)) void unpack_pair(const int q8, const void *wq, int p, int both,
                                                              __m256i w[4]) {
    if (q8)
        q8_pair((const int8_t *)wq + (size_t)p * 2 * QK, both, w);
    else
        q4_pair((const uint8_t *)wq + (size_t)p * QK, both, w);
}

/* One unpacked weight pair (scales wd) against R activation rows, rows `stride` pairs apart. */
static inline __attribute__((always_inline)) void pair_rows(const int R, __m256 *acc, const __m256i w[4], __m256 wd,
                                                            const int16_t *xq, const float *xd, size_t stride) {
    for (int t = 0; t < R; t++) {
        const __m256i *x = (const __m256i *)(xq + t * stride * 64);
#ifdef __AVX512VNNI__
        /* vpdpwssd: pairs of int16 products added into the int32 sums in one instruction (not
         * saturating; each lane's sum of 8 products of |q| <= 32767 by |w| <= 127 is exact) */
        __m256i s = _mm256_madd_epi16(w[0], _mm256_loadu_si256(x));
        s = _mm256_dpwssd_epi32(s, w[1], _mm256_loadu_si256(x + 1));
        s = _mm256_dpwssd_epi32(s, w[2], _mm256_loadu_si256(x + 2));
        s = _mm256_dpwssd_epi32(s, w[3], _mm256_loadu_si256(x + 3));
#else
        const __m256i s01 = _mm256_add_epi32(_mm256_madd_epi16(w[0], _mm256_loadu_si256(x)),
                                             _mm256_madd_epi16(w[1], _mm256_loadu_si256(x + 1)));
        const __m256i s23 = _mm256_add_epi32(_mm256_madd_epi16(w[2], _mm256_loadu_si256(x + 2)),
                                             _mm256_madd_epi16(w[3], _mm256_loadu_si256(x + 3)));
        const __m256i s = _mm256_add_epi32(s01, s23);
#endif
        const __m256 scale = _mm256_mul_ps(wd, _mm256_loadu_ps(xd + t * stride * 8));
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[t]);
    }
}

/* One weight row n against activation rows r0 .. r0 + R - 1, added to y (R and q8 constants after
 * inlining: one loop per format and tile height, accumulators in registers). The pairs' loop has no
 * branch: an odd last block is its own step. */
static inline __attribute__((always_inline)) void tile(const int R, const int q8, const act_t *a, int r0, int nb,
                                                       const void *wq, const uint16_t *dn, float *y, int N, int n) {
    __m256 acc[ROWS];
    for (int t = 0; t < ROWS; t++) acc[t] = _mm256_setzero_ps();
    const size_t P = a->pairs;
    const int16_t *xq = a->q + (size_t)r0 * P * 64;
    const float *xd = a->d + (size_t)r0 * P * 8;
    __m256i w[4];
    for (int p = 0; p < nb / 2; p++) {
        unpack_pair(q8, wq, p, 1, w);
        pair_rows(R, acc, w, pair_scales(dn, p), xq + p * 64, xd + p * 8, P);
    }
    if (nb % 2) {
        const int p = nb / 2;
        unpack_pair(q8, wq, p, 0, w);
        pair_rows(R, acc, w, pair_scale(_cvtsh_ss(dn[2 * p]), 0.0f), xq + p * 64, xd + p * 8, P);
    }
    /* the four rows' horizontal sums at once, in the same order for every row whatever R is (unused
     * rows are zeros): batch invariance */
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    float s[4];
    _mm_storeu_ps(s, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    for (int t = 0; t < R; t++) y[(size_t)(r0 + t) * N + n] += s[t];
}

/* Ask for weight row n + BLOCK_N (given row n's weights, scales and offsets): at one activation row
 * the hardware prefetcher alone leaves the loads waiting on memory some of the time. */
static inline void prefetch_row(const void *wq, size_t row_bytes, const uint16_t *dn, const uint16_t *mn, int nb) {
    const char *next = (const char *)wq + BLOCK_N * row_bytes;
    for (size_t off = 0; off < row_bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
    for (int b = 0; b < nb; b += 32) {
        _mm_prefetch((const char *)(dn + (size_t)BLOCK_N * nb + b), _MM_HINT_T0);
        if (mn) _mm_prefetch((const char *)(mn + (size_t)BLOCK_N * nb + b), _MM_HINT_T0);
    }
}

#define BY_ROWS(rows, call) \
    switch ((rows) < ROWS ? (rows) : ROWS) { \
    case 4: call(4); break; \
    case 3: call(3); break; \
    case 2: call(2); break; \
    default: call(1);       \
    }

/* Q4's offsets, y[r, n] = sum_b m[n, b] * sums[r, b], for rows r0 .. r1 - 1 and the block of
 * BLOCK_N outputs from n0, eight at a time. mt holds the offsets by blocks of BLOCK_N rows, each
 * transposed ([N / BLOCK_N, nb, BLOCK_N]): a block's are contiguous, as its weights are. Q8 has none.
 * Each sum is one chain of fused multiply-adds over the blocks, in block order; two rows' two
 * groups of eight run side by side, four chains at once, so the loop waits on no single one. */
static void offsets(const act_t *a, int nb, const uint16_t *mt, int N, int r0, int r1, int n0, int n1, float *y) {
    if (!mt) {
        for (int r = r0; r < r1; r++)
            for (int j = 0; j < n1 - n0; j++) y[(size_t)r * N + n0 + j] = 0.0f;
        return;
    }
    const uint16_t *mb = mt + (size_t)n0 * nb;
    for (int r = r0; r < r1; r += 2) {
        const int two = r + 1 < r1;
        const float *s0 = a->sums + (size_t)r * a->blocks, *s1 = two ? s0 + a->blocks : s0;
        __m256 o00 = _mm256_setzero_ps(), o01 = o00, o10 = o00, o11 = o00;
        for (int b = 0; b < nb; b++) {
            const uint16_t *mrow = mb + (size_t)b * BLOCK_N;
            const __m256 m0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)mrow));
            const __m256 m1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mrow + 8)));
            const __m256 x0 = _mm256_set1_ps(s0[b]), x1 = _mm256_set1_ps(s1[b]);
            o00 = _mm256_fmadd_ps(m0, x0, o00), o01 = _mm256_fmadd_ps(m1, x0, o01);
            o10 = _mm256_fmadd_ps(m0, x1, o10), o11 = _mm256_fmadd_ps(m1, x1, o11);
        }
        float *y0 = y + (size_t)r * N + n0, *y1 = y0 + N;
        _mm256_storeu_ps(y0, o00), _mm256_storeu_ps(y0 + 8, o01);
        if (two) _mm256_storeu_ps(y1, o10), _mm256_storeu_ps(y1 + 8, o11);
    }
}

/* The blocks of BLOCK_N outputs that part `part` of `parts` computes: [*lo, *hi), contiguous, in
 * order, the same split wherever the product runs (so a part can prefetch its first block). */
static void part_blocks(int N, int part, int parts, int *lo, int *hi) {
    const int blocks = (N + BLOCK_N - 1) / BLOCK_N;
    *lo = (int)((int64_t)blocks * part / parts);
    *hi = (int)((int64_t)blocks * (part + 1) / parts);
}

/* y's columns of part `part` of `parts` (see part_blocks) for the quantized activations a [M, K]
 * (either block format; mt, Q4's offsets (see `offsets`), NULL for Q8). Each output is computed
 * the same way whatever the split. */
static void products(const act_t *a, int M, int K, const void *qs, const uint16_t *wd, const uint16_t *mt, int N,
                     float *y, int part, int parts) {
    const int nb = K / QK;
    const size_t row_bytes = mt ? (size_t)nb * QK / 2 : (size_t)K;
    int lo, hi;
    part_blocks(N, part, parts, &lo, &hi);
    const int end = hi * BLOCK_N < N ? hi * BLOCK_N : N; /* the part's last output + 1 */
    /* Blocks of BLOCK_N weight rows and tiles of ROWS activation rows: both stay in L1 while the
     * tiles pass over the block (an activation row's int16 copy is 2 K bytes: at K = 1536 the
     * whole step's no longer fits and was re-read from L2 for every weight row). */
    for (int c0 = 0; c0 < M; c0 += ROW_CHUNK) {
        const int c1 = c0 + ROW_CHUNK < M ? c0 + ROW_CHUNK : M;
        for (int n0 = lo * BLOCK_N; n0 < hi * BLOCK_N; n0 += BLOCK_N) {
            const int n1 = n0 + BLOCK_N < N ? n0 + BLOCK_N : N;
            offsets(a, nb, mt, N, c0, c1, n0, n1, y);
            for (int r0 = c0; r0 < c1; r0 += ROWS)
                for (int n = n0; n < n1; n++) {
                    const void *wq = (const uint8_t *)qs + (size_t)n * row_bytes;
                    const uint16_t *dn = wd + (size_t)n * nb;
                    if (r0 == c0 && n + BLOCK_N < end) /* the next block's row, while this one computes */
                        prefetch_row(wq, row_bytes, dn, mt ? mt + (size_t)n * nb : NULL, nb);
#define TILE_Q4(R) tile(R, 0, a, r0, nb, wq, dn, y, N, n)
#define TILE_Q8(R) tile(R, 1, a, r0, nb, wq, dn, y, N, n)
                    if (mt) {
                        BY_ROWS(c1 - r0, TILE_Q4)
                    } else {
                        BY_ROWS(c1 - r0, TILE_Q8)
                    }
#undef TILE_Q4
#undef TILE_Q8
                }
        }
    }
}

/* y[M, N] = x[M, K] @ w[N, K]^T for either block format (Q4: N a multiple of BLOCK_N); mt (Q4's
 * offsets, see `offsets`) NULL for Q8. */
static int matmul(const float *x, int M, int K, const void *qs, const uint16_t *wd, const uint16_t *mt, int N,
                  float *y) {
    act_t a;
    if (act_alloc(&a, x, M, K)) {
        cortex_act_free(&a);
        return -1;
    }
#pragma omp parallel
    products(&a, M, K, qs, wd, mt, N, y, omp_get_thread_num(), omp_get_num_threads());
    cortex_act_free(&a);
    return 0;
}

/* w's product with the quantized rows a [M, w->k] into y [M, w->n]: the columns of part `part` of
 * `parts` only, for the threads of a parallel region that split a product between them (decode.c). */
void cortex_linear_part(const linear_t *w, const act_t *a, int M, float *y, int part, int parts) {
    products(a, M, (int)w->k, w->q, w->d, w->m, (int)w->n, y, part, parts);
}

/* Ask for the first block of weight rows (and their scales and offsets) that part `part` of
 * `parts` of w's product reads first, ahead of the product: at one row the start of each product
 * otherwise waits on memory until the hardware prefetcher catches on. */
void cortex_linear_prefetch(const linear_t *w, int part, int parts) {
    const int nb = (int)(w->k / QK);
    const size_t row_bytes = w->m ? (size_t)nb * QK / 2 : (size_t)w->k;
    int lo, hi;
    part_blocks((int)w->n, part, parts, &lo, &hi);
    if (lo >= hi) return;
    const size_t n0 = (size_t)lo * BLOCK_N;
    const char *wq = (const char *)w->q + n0 * row_bytes;
    for (size_t off = 0; off < BLOCK_N * row_bytes; off += 64) _mm_prefetch(wq + off, _MM_HINT_T0);
    for (size_t b = 0; b < (size_t)BLOCK_N * nb; b += 32) {
        _mm_prefetch((const char *)(w->d + n0 * nb + b), _MM_HINT_T0);
        if (w->m) _mm_prefetch((const char *)(w->m + n0 * nb + b), _MM_HINT_T0);
    }
}

/* Q4 weights: qs [N, K/32, 16] bytes, d [N, K/32], mt the offsets by blocks of 16 rows, each block
 * transposed: [N/16, K/32, 16]. */
int cortex_q4_matmul(const float *x, int M, int K, const uint8_t *qs, const uint16_t *wd, const uint16_t *mt, int N,
                     float *y) {
    return matmul(x, M, K, qs, wd, mt, N, y);
}

/* Q8 weights: qs [N, K] int8 (pairs of blocks interleaved, see q8_pair), d [N, K/32]. */
int cortex_q8_matmul(const float *x, int M, int K, const int8_t *qs, const uint16_t *wd, int N, float *y) {
    return matmul(x, M, K, qs, wd, NULL, N, y);
}
