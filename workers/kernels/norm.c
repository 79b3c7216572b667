/* RMSNorm for the CPU (AVX2 + FMA, float32): one call per norm instead of PyTorch's half dozen
 * element-wise ops, each of which costs more in dispatch than the arithmetic at decode sizes.
 *
 *   out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w
 *
 * The residual variant first adds the sublayer's output to the residual stream (sum = x + delta)
 * and normalizes that sum, the step between attention and MLP. Rows are independent, so a row's
 * result does not depend on what else is in the batch.
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>

static float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

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

/* x, out: [M, D]; w: [D]. */
void cortex_rms_norm(const float *x, int M, int D, const float *w, float eps, float *out) {
#pragma omp parallel for schedule(static) if (M >= 64)
    for (int r = 0; r < M; r++) norm_row(x + (size_t)r * D, D, w, eps, out + (size_t)r * D);
}

/* sum = x + delta, out = rms_norm(sum) * w; all [M, D]. */
void cortex_add_rms_norm(const float *x, const float *delta, int M, int D, const float *w, float eps, float *sum,
                         float *out) {
#pragma omp parallel for schedule(static) if (M >= 64)
    for (int r = 0; r < M; r++) {
        const size_t o = (size_t)r * D;
        int i = 0;
        for (; i + 8 <= D; i += 8)
            _mm256_storeu_ps(sum + o + i, _mm256_add_ps(_mm256_loadu_ps(x + o + i), _mm256_loadu_ps(delta + o + i)));
        for (; i < D; i++) sum[o + i] = x[o + i] + delta[o + i];
        norm_row(sum + o, D, w, eps, out + o);
    }
}
