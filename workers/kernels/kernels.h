/* The kernels' entry points and shared types, for the files that call each other (decode.c, moe.c). */
#ifndef CORTEX_KERNELS_H
#define CORTEX_KERNELS_H

#include <stdint.h>

/* One weight in a native block format (qmatmul.c). */
typedef struct {
    const void *q;      /* Q4: uint8 [N, K/32, 16]; Q8: int8 [N, K] */
    const uint16_t *d, *m; /* [N, K/32] float16 scales and (Q4 only; NULL for Q8) offsets */
    int64_t n, k;
} linear_t;

/* A product's activations, quantized per row and block of 32 inputs to int16 (qmatmul.c says how). */
typedef struct {
    int16_t *q;
    float *d, *sums;
    int pairs, blocks;
} act_t;

/* A mixture-of-experts layer (moe.c): a float32 router and each expert's packed SwiGLU MLP. */
typedef struct {
    const float *router;            /* [experts, H]; only the whole-step path (decode.c) routes */
    const linear_t *gate_up, *down; /* [experts] each: [2 inter, H] (gate rows first), [H, inter] */
    int64_t experts, inter, top_k, norm_topk;
} moe_t;

int cortex_q4_matmul(const float *x, int M, int K, const uint8_t *qs, const uint16_t *wd, const uint16_t *wm, int N,
                     float *y);
int cortex_q8_matmul(const float *x, int M, int K, const int8_t *qs, const uint16_t *wd, int N, float *y);
int cortex_paged_attention(const float *q, const void *k, const void *v, const int64_t *tables, int width,
                           const int64_t *lengths, int B, int Hq, int Hkv, int D, int block, float scale, float *out,
                           int half);
void cortex_rope_store(const float *qkv, int T, int Hq, int Hkv, int D, const float *cos, const float *ssin,
                       const int64_t *positions, const int64_t *slots, void *k_pool, void *v_pool, float *q_out,
                       int half);
void cortex_rms_norm(const float *x, int M, int D, const float *w, float eps, float *out);
void cortex_add_rms_norm(const float *x, const float *delta, int M, int D, const float *w, float eps, float *sum,
                         float *out);
void cortex_swiglu(const float *gu, int M, int I, float *out);
int cortex_linear(const linear_t *w, const float *x, int M, float *y);
int cortex_act_alloc(act_t *a, int M, int K);
void cortex_act_quantize(act_t *a, const float *x, int M, int K);
void cortex_act_free(act_t *a);
void cortex_linear_part(const linear_t *w, const act_t *a, int M, float *y, int part, int parts);
void cortex_linear_prefetch(const linear_t *w, int part, int parts);
int cortex_attention_part(const float *q, const void *k, const void *v, const int64_t *tables, int width,
                          const int64_t *lengths, int B, int Hq, int Hkv, int D, int block, float scale, float *out,
                          int half, int part, int parts);
int cortex_moe_experts(const float *x, int T, int H, const int64_t *ids, const float *w, int k, const moe_t *m,
                       float *y);
int cortex_moe_route(const float *h, int T, int H, const moe_t *m, int64_t *ids, float *w);
int cortex_moe_block(const float *h, int T, int H, const moe_t *m, float *out);

#endif
