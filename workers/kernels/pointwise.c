/* Row-wise and element-wise layer ops for the CPU (AVX2 + FMA, float32): one call each instead of
 * several PyTorch ops, each of which costs more in dispatch than the arithmetic at decode sizes.
 *
 *   out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w
 *
 * The residual variant first adds the sublayer's output to the residual stream (sum = x + delta)
 * and normalizes that sum, the step between attention and MLP. Rows are independent, so a row's
 * result does not depend on what else is in the batch.
 */
#include <math.h>
#include <stddef.h>

#include "simd.h"

static void norm_row(const float *x, int D, const float *w, float eps, float *out) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= D; i += 16) {
        const __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
        a0 = _mm256_fmadd_ps(u, u, a0);
        a1 = _mm256_fmadd_ps(v, v, a1);
    }
    float ss = hsum(_mm256_add_ps(a0, a1));
    for (; i < D; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)D + eps);
    const __m256 s = _mm256_set1_ps(inv);
    i = 0;
    for (; i + 8 <= D; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), s), _mm256_loadu_ps(w + i)));
    for (; i < D; i++) out[i] = x[i] * inv * w[i];
}

/* Each function runs its rows on one thread below a size where a parallel region costs more than
 * it saves (a region costs about 0.3 us even when it runs on one thread), on all of them above. */

/* x, out: [M, D]; w: [D]. */
void cortex_rms_norm(const float *x, int M, int D, const float *w, float eps, float *out) {
    if (M < 64) {
        for (int r = 0; r < M; r++) norm_row(x + (size_t)r * D, D, w, eps, out + (size_t)r * D);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int r = 0; r < M; r++) norm_row(x + (size_t)r * D, D, w, eps, out + (size_t)r * D);
}

static void add_norm_row(const float *x, const float *delta, int D, const float *w, float eps, float *sum,
                         float *out) {
    int i = 0;
    for (; i + 8 <= D; i += 8)
        _mm256_storeu_ps(sum + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(delta + i)));
    for (; i < D; i++) sum[i] = x[i] + delta[i];
    norm_row(sum, D, w, eps, out);
}

/* sum = x + delta, out = rms_norm(sum) * w; all [M, D]. */
void cortex_add_rms_norm(const float *x, const float *delta, int M, int D, const float *w, float eps, float *sum,
                         float *out) {
#define ROW(r) add_norm_row(x + (size_t)(r) * D, delta + (size_t)(r) * D, D, w, eps, sum + (size_t)(r) * D, \
                            out + (size_t)(r) * D)
    if (M < 64) {
        for (int r = 0; r < M; r++) ROW(r);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int r = 0; r < M; r++) ROW(r);
#undef ROW
}

/* out = silu(g) * u over I elements. */
static void swiglu_row(const float *g, const float *u, int I, float *o) {
    int i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    for (; i + 8 <= I; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, exp256(_mm256_xor_ps(x, sign))));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
    }
    for (; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* SwiGLU: out[r] = silu(gate) * up, where row r of gu is [gate (I) | up (I)]; out: [M, I]. */
void cortex_swiglu(const float *gu, int M, int I, float *out) {
#define ROW(r) swiglu_row(gu + (size_t)(r) * 2 * I, gu + (size_t)(r) * 2 * I + I, I, out + (size_t)(r) * I)
    if ((long)M * I < 65536) {
        for (int r = 0; r < M; r++) ROW(r);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int r = 0; r < M; r++) ROW(r);
#undef ROW
}
