/* A whole decode step's decoder layers in one call: the same kernels the model's Python forward
 * calls one by one (so the same results, bit for bit), without a Python round trip per op. At one
 * sequence the round trips cost about a third of a step: some 300 calls into PyTorch and ctypes.
 *
 * Only for steps where every row decodes (prefill chunks need PyTorch's attention), on one rank
 * (no all-reduce between layers), with every linear in a native block format and no biases; the
 * caller checks (workers/arch/llama.py). A layer's MLP is dense SwiGLU, or (Qwen3-MoE) a mixture
 * of experts: a float32 router and packed experts (moe.c).
 *
 * Up to TEAM_ROWS rows of dense layers run in one OpenMP parallel region (decode_team); more rows,
 * or experts, run each kernel in its own region, as the model's forward does.
 *
 * Optionally the step goes on to its logits (head_t): the final norm of the sequences' last rows
 * and the head's product (a packed linear), in the same region, so a step is one call and one
 * region with no Python between the layers and the head.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define TEAM_ROWS 8 /* the most rows the one-region path takes (see decode_team) */

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

/* The step's logits: the final RMSNorm of rows `last` of the residual stream, times the head. */
typedef struct {
    const float *norm;   /* [H] */
    const linear_t *w;   /* [vocab, H], either block format */
    const int64_t *last; /* [S] rows of x */
    int S;
    float *logits; /* [S, vocab] */
} head_t;

/* A step's shapes and buffers, shared by both paths. */
typedef struct {
    int T, H, L, Hq, Hkv, D, inter, width, block, half;
    float eps, scale;
    const float *cos, *ssin; /* tables: row p holds position p's angles */
    const int64_t *positions;
    const int64_t *slots, *tables, *lengths;
    void *k_pool, *v_pool;
    int64_t layer_stride;
    const head_t *head; /* NULL: the layers only */
} step_t;

/* Layer l's K and V pools. */
static void layer_pools(const step_t *s, int l, void **kl, void **vl) {
    const size_t offset = (size_t)l * s->layer_stride * (s->half ? 2 : 4);
    *kl = (char *)s->k_pool + offset, *vl = (char *)s->v_pool + offset;
}

/* Per-head norms (Qwen3), RoPE and the KV write of the projections qkv [T, heads, D]; q: [T, Hq, D]. */
static void rope_store(const step_t *s, const layer_t *w, float *qkv, void *kl, void *vl, float *q) {
    const int heads = s->Hq + 2 * s->Hkv, D = s->D;
    if (w->q_norm)
        for (int t = 0; t < s->T; t++) { /* per head, in place: q heads, then k heads */
            float *row = qkv + (size_t)t * heads * D;
            cortex_rms_norm(row, s->Hq, D, w->q_norm, s->eps, row);
            cortex_rms_norm(row + (size_t)s->Hq * D, s->Hkv, D, w->k_norm, s->eps, row + (size_t)s->Hq * D);
        }
    cortex_rope_store(qkv, s->T, s->Hq, s->Hkv, D, s->cos, s->ssin, s->positions, s->slots, kl, vl, q, s->half);
}

/* The logits of the rows s->head->last of the residual stream x [T, H]: their final norm into h
 * [S, H], quantized into a, and part `part` of `parts` of the head's product (a thread's share in
 * decode_team; the whole in the per-kernel path, which passes a = NULL). Returns 0 or -1. */
static int head_part(const step_t *s, const float *x, float *h, act_t *a, int part, int parts) {
    const head_t *hd = s->head;
    for (int i = 0; i < hd->S; i++) /* as the model's norm on the gathered rows: row by row */
        cortex_rms_norm(x + (size_t)hd->last[i] * s->H, 1, s->H, hd->norm, s->eps, h + (size_t)i * s->H);
    if (!a) return cortex_linear(hd->w, h, hd->S, hd->logits);
    cortex_act_quantize(a, h, hd->S, s->H);
    cortex_linear_part(hd->w, a, hd->S, hd->logits, part, parts);
    return 0;
}

/* A few rows (T <= TEAM_ROWS) through dense layers in one parallel region: at one row a step is
 * some 150 products and attentions of a few microseconds each, and a region per kernel call, with
 * the threads joining and forking around the one-thread parts, cost more than barriers do. Each
 * thread computes the small one-thread parts (norms, quantizing a product's input, SwiGLU, the
 * residual add) itself, on its own copies, rather than wait on one that does; the products and
 * the attention are split between the threads, and each thread asks for the first weights of its
 * part of the next product as soon as it is done with this one. Every result is computed as the
 * per-kernel path computes it: the same bits. Returns as cortex_decode_layers.
 * Splitting the q, k and v projections by whole heads, so that each thread could apply RoPE and
 * write the KV pool for its own heads without the barriers around thread 0 doing it all, measured
 * no faster at one row on two threads (SmolLM2: 7 and 8 of 15 heads; the imbalance ate the barrier). */
static int decode_team(float *x, const layer_t *layers, const step_t *s) {
    const int T = s->T, H = s->H, heads = s->Hq + 2 * s->Hkv, wide = s->inter > H ? s->inter : H;
    const int threads = omp_get_max_threads(), qd = s->Hq * s->D, kmax = wide > qd ? wide : qd;
    const size_t rows = (size_t)T * (H + wide); /* a thread's h and SwiGLU rows */
    float *qkv = malloc(sizeof(float) * T * heads * s->D), *q = malloc(sizeof(float) * T * qd);
    float *att = malloc(sizeof(float) * T * qd), *o = malloc(sizeof(float) * T * H);
    float *gu = malloc(sizeof(float) * T * 2 * s->inter), *own = malloc(sizeof(float) * threads * rows);
    float *copies = malloc(sizeof(float) * threads * T * H); /* residual streams of threads 1 .. */
    act_t *acts = calloc(threads, sizeof(act_t));
    int rc = qkv && q && att && o && gu && own && copies && acts ? 0 : -1;
    for (int i = 0; i < threads && !rc; i++) rc = cortex_act_alloc(&acts[i], T, kmax);
    if (!rc) {
#pragma omp parallel
        {
            const int me = omp_get_thread_num(), team = omp_get_num_threads();
            float *xr = me ? copies + (size_t)me * T * H : x, *h = own + (size_t)me * rows, *act = h + (size_t)T * H;
            act_t *a = &acts[me];
            if (me) memcpy(xr, x, sizeof(float) * T * H);
            cortex_linear_prefetch(&layers[0].qkv, me, team);
            for (int l = 0; l < s->L; l++) {
                const layer_t *w = &layers[l];
                void *kl, *vl;
                layer_pools(s, l, &kl, &vl);
                cortex_rms_norm(xr, T, H, w->input_norm, s->eps, h);
                cortex_act_quantize(a, h, T, H);
                cortex_linear_part(&w->qkv, a, T, qkv, me, team);
                cortex_linear_prefetch(&w->o, me, team);
#pragma omp barrier
                if (me == 0) rope_store(s, w, qkv, kl, vl, q); /* one writer of the KV pool */
#pragma omp barrier
                if (cortex_attention_part(q, kl, vl, s->tables, s->width, s->lengths, T, s->Hq, s->Hkv, s->D,
                                          s->block, s->scale, att, s->half, me, team)) {
#pragma omp atomic write
                    rc = -1;
                }
#pragma omp barrier
                cortex_act_quantize(a, att, T, qd);
                cortex_linear_part(&w->o, a, T, o, me, team);
                cortex_linear_prefetch(&w->gate_up, me, team);
#pragma omp barrier
                cortex_add_rms_norm(xr, o, T, H, w->post_norm, s->eps, xr, h);
                cortex_act_quantize(a, h, T, H);
                cortex_linear_part(&w->gate_up, a, T, gu, me, team);
                cortex_linear_prefetch(&w->down, me, team);
#pragma omp barrier
                cortex_swiglu(gu, T, s->inter, act);
                cortex_act_quantize(a, act, T, s->inter);
                cortex_linear_part(&w->down, a, T, o, me, team);
                if (l + 1 < s->L) cortex_linear_prefetch(&layers[l + 1].qkv, me, team);
                if (l + 1 == s->L && s->head) cortex_linear_prefetch(s->head->w, me, team);
#pragma omp barrier
                for (size_t i = 0; i < (size_t)T * H; i++) xr[i] += o[i];
            }
            if (s->head) head_part(s, xr, h, a, me, team); /* each thread's own rows: no barrier */
        }
    }
    for (int i = 0; i < threads && acts; i++) cortex_act_free(&acts[i]);
    free(qkv), free(q), free(att), free(o), free(gu), free(own), free(copies), free(acts);
    return rc;
}

/* x: [T, H], the residual stream, updated in place through all L layers. The KV pools are
 * [L, slots, Hkv, D] (layer_stride elements per layer; float16 when half, else float32); cos, ssin: the
 * angle tables, row p for position p, each row's position in positions [T]; slots, tables, lengths as the
 * kernels they go to; inter: the dense MLPs' intermediate size. With a head (not NULL; norm: the
 * final norm's weight [H]), the logits of rows last [S] of x after the layers go to logits [S,
 * head->n] (x is then left as the last layer made it, as without). Returns 0, -1 when a buffer
 * could not be allocated, or -2 for an expert id out of range. */
int cortex_decode_layers(float *x, int T, int H, const layer_t *layers, int L, int Hq, int Hkv, int D, int inter,
                         float eps, const float *cos, const float *ssin, const int64_t *positions, const int64_t *slots, void *k_pool,
                         void *v_pool, int64_t layer_stride, const int64_t *tables, int width,
                         const int64_t *lengths, int block, float scale, int half, const float *norm,
                         const linear_t *head, const int64_t *last, int S, float *logits) {
    const head_t hd = {.norm = norm, .w = head, .last = last, .S = S, .logits = logits};
    const step_t s = {.T = T, .H = H, .L = L, .Hq = Hq, .Hkv = Hkv, .D = D, .inter = inter, .width = width,
                      .block = block, .half = half, .eps = eps, .scale = scale, .cos = cos, .ssin = ssin, .positions = positions,
                      .slots = slots, .tables = tables, .lengths = lengths, .k_pool = k_pool, .v_pool = v_pool,
                      .layer_stride = layer_stride, .head = head ? &hd : NULL};
    int dense = 1;
    for (int l = 0; l < L; l++) dense &= layers[l].moe == NULL;
    if (dense && T <= TEAM_ROWS) return decode_team(x, layers, &s);
    const int heads = Hq + 2 * Hkv;
    float *h = malloc(sizeof(float) * T * H), *qkv = malloc(sizeof(float) * T * heads * D);
    float *q = malloc(sizeof(float) * T * Hq * D), *att = malloc(sizeof(float) * T * Hq * D);
    float *o = malloc(sizeof(float) * T * H), *gu = malloc(sizeof(float) * T * 2 * inter + 1);
    float *act = malloc(sizeof(float) * T * inter + 1); /* + 1: never malloc(0) (every MLP with experts) */
    int rc = (h && qkv && q && att && o && gu && act) ? 0 : -1;
    for (int l = 0; l < L && !rc; l++) {
        const layer_t *w = &layers[l];
        void *kl, *vl;
        layer_pools(&s, l, &kl, &vl);
        cortex_rms_norm(x, T, H, w->input_norm, eps, h);
        if ((rc = cortex_linear(&w->qkv, h, T, qkv))) break;
        rope_store(&s, w, qkv, kl, vl, q);
        if ((rc = cortex_paged_attention(q, kl, vl, tables, width, lengths, T, Hq, Hkv, D, block, scale, att, half)))
            break;
        if ((rc = cortex_linear(&w->o, att, T, o))) break;
        cortex_add_rms_norm(x, o, T, H, w->post_norm, eps, x, h);
        if ((rc = mlp(w, h, T, H, inter, gu, act, o))) break;
        for (size_t i = 0; i < (size_t)T * H; i++) x[i] += o[i];
    }
    if (!rc && head) rc = head_part(&s, x, h, NULL, 0, 1);
    free(h), free(qkv), free(q), free(att), free(o), free(gu), free(act);
    return rc;
}
