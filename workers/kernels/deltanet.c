/* One decode step of a Gated DeltaNet layer (Qwen3.5 / Qwen3-Next linear attention) for a batch of
 * single-token rows, float32, from the fused input projection to the gated norm's output: what
 * workers/arch/deltanet.py computes with about forty PyTorch ops per layer, here in one call.
 *
 * For each row (a sequence, its state in slot s) and each value head h:
 *
 *   conv   c = silu(sum_t w[t] * [conv state | x][t])     per channel of q, k, v; the state shifts
 *   q, k   l2-normalized per key head (q also times dk^-1/2); value head h reads key head h / rep
 *   gates  beta = sigmoid(b),  g = -exp(A_log) * softplus(a + dt_bias)      (float32 throughout)
 *   rule   S = exp(g) S;  u = beta (v - S^T k);  S += k u^T;  o = S^T q       (S: [dk, dv], in place)
 *   norm   out = w * rms_norm(o) * silu(z)
 *
 * The state is the big operand (64 KB per head, 1 MB per layer and sequence at Qwen3.5-0.8B's 16
 * heads of 128 x 128), so the rule reads it from memory once: one pass takes S^T k and S^T q
 * together, then the update runs over the same head while it is still in L2 and writes it back. The
 * output needs no third pass: o = exp(g) S^T q + (k.q) u.
 *
 * Each (row, head) is computed in the same order whatever else is in the batch, so a sequence's
 * result does not depend on its neighbours.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

/* silu in place over n floats (x / (1 + e^-x), as PyTorch's) */
static void silu_inplace(float *x, int n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(one, exp256(_mm256_xor_ps(v, sign)))));
    }
    for (; i < n; i++) x[i] = x[i] / (1.0f + expf(-x[i]));
}

/* One head's channels [c0, c0 + n) of one row: the causal conv over its state and the new input,
 * the state shifted by one, silu; with `scale` > 0, then l2-normalized and times `scale` (q, k). */
static void conv_segment(const float *x, float *state, const float *w, int c0, int n, int kernel, float scale,
                         float *act) {
    const int keep = kernel - 1;
    for (int c = c0; c < c0 + n; c++) {
        float *st = state + (size_t)c * keep;
        const float *wc = w + (size_t)c * kernel;
        float acc = 0.0f;
        for (int t = 0; t < keep; t++) acc += st[t] * wc[t];
        acc += x[c] * wc[keep];
        for (int t = 0; t + 1 < keep; t++) st[t] = st[t + 1];
        if (keep) st[keep - 1] = x[c];
        act[c] = acc;
    }
    silu_inplace(act + c0, n);
    if (scale > 0.0f) {
        float ss = 0.0f;
        for (int i = c0; i < c0 + n; i++) ss += act[i] * act[i];
        const float inv = 1.0f / sqrtf(ss + 1e-6f); /* the eps inside the root, as the reference */
        for (int i = c0; i < c0 + n; i++) act[i] = act[i] * inv * scale;
    }
}

static float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); } /* PyTorch's threshold */

/* The gated delta rule on one head's state S [dk, dv] in place; o [dv] = S'^T q. */
static void delta_head(float *restrict S, const float *restrict q, const float *restrict k, const float *restrict v,
                       float decay, float beta, int dk, int dv, float *restrict o) {
    float rk[dv], rq[dv]; /* S^T k and S^T q, read in one pass over S */
    for (int j = 0; j < dv; j++) rk[j] = rq[j] = 0.0f;
    float kq = 0.0f;
    for (int i = 0; i < dk; i++) {
        const float *restrict row = S + (size_t)i * dv;
        const float ki = k[i], qi = q[i];
        kq += ki * qi;
        for (int j = 0; j < dv; j++) {
            rk[j] += row[j] * ki;
            rq[j] += row[j] * qi;
        }
    }
    float *restrict u = rk; /* u = beta (v - exp(g) S^T k): what S did not already predict for k */
    for (int j = 0; j < dv; j++) {
        u[j] = (v[j] - decay * rk[j]) * beta;
        o[j] = decay * rq[j] + kq * u[j];
    }
    for (int i = 0; i < dk; i++) {
        float *restrict row = S + (size_t)i * dv;
        const float ki = k[i];
        for (int j = 0; j < dv; j++) row[j] = row[j] * decay + ki * u[j];
    }
}

/* out = w * rms_norm(o) * silu(z) over one head's dv values */
static void gated_norm(const float *o, const float *z, const float *w, int dv, float eps, float *out) {
    float ss = 0.0f;
    for (int j = 0; j < dv; j++) ss += o[j] * o[j];
    const float inv = 1.0f / sqrtf(ss / (float)dv + eps);
    for (int j = 0; j < dv; j++) out[j] = z[j];
    silu_inplace(out, dv);
    for (int j = 0; j < dv; j++) out[j] = w[j] * (o[j] * inv) * out[j];
}

/* B single-token rows of a step. Row b is rows[b] of `proj` (stride proj_stride floats), the fused
 * input projection [q (hk dk) | k (hk dk) | v (hv dv) | z (hv dv) | b (hv) | a (hv)], and uses state
 * slot slots[b] of `conv_state` [slots, C, kernel - 1] (C = 2 hk dk + hv dv) and `delta_state`
 * [slots, hv, dk, dv], both updated in place. `conv_w`: [C, kernel]; `a_log`, `dt_bias`: [hv];
 * `norm_w`: [dv]. Writes the gated norm's output [hv dv] to row rows[b] of `out` (stride
 * out_stride). Returns -1 (nothing computed) when its scratch cannot be allocated. */
int cortex_deltanet_decode(const float *proj, int64_t proj_stride, int B, const int64_t *rows, const int64_t *slots,
                           float *conv_state, const float *conv_w, float *delta_state, const float *a_log,
                           const float *dt_bias, const float *norm_w, float eps, int hk, int hv, int dk, int dv,
                           int kernel, float *out, int64_t out_stride) {
    const int key = hk * dk, value = hv * dv, C = 2 * key + value, rep = hv / hk;
    const int segments = 2 * hk + hv; /* q heads, k heads, v heads: the conv's units of work */
    float *act = malloc(sizeof(float) * (size_t)B * C);
    if (!act) return -1;
#pragma omp parallel if (B * hv > 1)
    {
#pragma omp for schedule(static)
        for (int t = 0; t < B * segments; t++) {
            const int b = t / segments, s = t % segments;
            const float *x = proj + rows[b] * proj_stride;
            float *state = conv_state + (size_t)slots[b] * C * (kernel - 1);
            if (s < 2 * hk) /* q (scaled) or k: one key head */
                conv_segment(x, state, conv_w, s * dk, dk, kernel, s < hk ? 1.0f / sqrtf((float)dk) : 1.0f,
                             act + (size_t)b * C);
            else
                conv_segment(x, state, conv_w, 2 * key + (s - 2 * hk) * dv, dv, kernel, 0.0f, act + (size_t)b * C);
        }
#pragma omp for schedule(static)
        for (int t = 0; t < B * hv; t++) {
            const int b = t / hv, h = t % hv, kh = h / rep;
            const float *x = proj + rows[b] * proj_stride, *a = act + (size_t)b * C;
            const float beta = 1.0f / (1.0f + expf(-x[C + value + h]));
            const float g = -expf(a_log[h]) * softplus(x[C + value + hv + h] + dt_bias[h]);
            float *S = delta_state + ((size_t)slots[b] * hv + h) * dk * dv;
            float o[dv];
            delta_head(S, a + kh * dk, a + key + kh * dk, a + 2 * key + h * dv, expf(g), beta, dk, dv, o);
            gated_norm(o, x + C + h * dv, norm_w, dv, eps, out + rows[b] * out_stride + h * dv);
        }
    }
    free(act);
    return 0;
}
