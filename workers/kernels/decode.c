/* A whole decode step's decoder layers in one call: the same kernels the model's Python forward
 * calls one by one (so the same results, bit for bit), without a Python round trip per op. At one
 * sequence the round trips cost about a third of a step: some 300 calls into PyTorch and ctypes.
 *
 * Only for steps where every row decodes (prefill chunks need PyTorch's attention), on one rank
 * (no all-reduce between layers), with every linear in a native block format and no biases; the
 * caller checks (workers/arch/llama.py). A layer's MLP is dense SwiGLU, or (Qwen3-MoE) a mixture
 * of experts: a float32 router and packed experts (moe.c).
 */
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"

typedef struct {
    const float *input_norm, *post_norm; /* [H] */
    const float *q_norm, *k_norm;        /* [D] each (Qwen3), or NULL */
    linear_t qkv, o, gate_up, down;      /* gate_up and down unused where moe is set */
    const moe_t *moe;                    /* the layer's experts, or NULL: a dense MLP */
} layer_t;

/* The MLP of the post-attention-normed rows h [T, H] into out [T, H]; gu and act: the dense
 * MLP's buffers. */
static int mlp(const layer_t *w, const float *h, int T, int H, int inter, float *gu, float *act, float *out) {
    if (w->moe) return cortex_moe_block(h, T, H, w->moe, out);
    int rc = cortex_linear(&w->gate_up, h, T, gu);
    if (rc) return rc;
    cortex_swiglu(gu, T, inter, act);
    return cortex_linear(&w->down, act, T, out);
}

/* x: [T, H], the residual stream, updated in place through all L layers. The KV pools are
 * [L, slots, Hkv, D] (layer_stride elements per layer; float16 when half, else float32); cos, ssin, slots, tables, lengths as the
 * kernels they go to; inter: the dense MLPs' intermediate size. Returns 0, -1 when a buffer could
 * not be allocated, or -2 for an expert id out of range. */
int cortex_decode_layers(float *x, int T, int H, const layer_t *layers, int L, int Hq, int Hkv, int D, int inter,
                         float eps, const float *cos, const float *ssin, const int64_t *slots, void *k_pool,
                         void *v_pool, int64_t layer_stride, const int64_t *tables, int width,
                         const int64_t *lengths, int block, float scale, int half) {
    const int heads = Hq + 2 * Hkv;
    float *h = malloc(sizeof(float) * T * H), *qkv = malloc(sizeof(float) * T * heads * D);
    float *q = malloc(sizeof(float) * T * Hq * D), *att = malloc(sizeof(float) * T * Hq * D);
    float *o = malloc(sizeof(float) * T * H), *gu = malloc(sizeof(float) * T * 2 * inter + 1);
    float *act = malloc(sizeof(float) * T * inter + 1); /* + 1: never malloc(0) (every MLP with experts) */
    int rc = (h && qkv && q && att && o && gu && act) ? 0 : -1;
    for (int l = 0; l < L && !rc; l++) {
        const layer_t *w = &layers[l];
        const size_t elem = half ? 2 : 4, offset = (size_t)l * layer_stride * elem;
        void *kl = (char *)k_pool + offset, *vl = (char *)v_pool + offset;
        cortex_rms_norm(x, T, H, w->input_norm, eps, h);
        if ((rc = cortex_linear(&w->qkv, h, T, qkv))) break;
        if (w->q_norm)
            for (int t = 0; t < T; t++) { /* per head, in place: q heads, then k heads */
                float *row = qkv + (size_t)t * heads * D;
                cortex_rms_norm(row, Hq, D, w->q_norm, eps, row);
                cortex_rms_norm(row + (size_t)Hq * D, Hkv, D, w->k_norm, eps, row + (size_t)Hq * D);
            }
        cortex_rope_store(qkv, T, Hq, Hkv, D, cos, ssin, slots, kl, vl, q, half);
        if ((rc = cortex_paged_attention(q, kl, vl, tables, width, lengths, T, Hq, Hkv, D, block, scale, att, half)))
            break;
        if ((rc = cortex_linear(&w->o, att, T, o))) break;
        cortex_add_rms_norm(x, o, T, H, w->post_norm, eps, x, h);
        if ((rc = mlp(w, h, T, H, inter, gu, act, o))) break;
        for (size_t i = 0; i < (size_t)T * H; i++) x[i] += o[i];
    }
    free(h), free(qkv), free(q), free(att), free(o), free(gu), free(act);
    return rc;
}
