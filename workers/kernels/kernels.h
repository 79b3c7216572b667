/* The kernels' entry points, for the files that call each other (decode.c). */
#ifndef CORTEX_KERNELS_H
#define CORTEX_KERNELS_H

#include <stdint.h>

int cortex_q4_matmul(const float *x, int M, int K, const uint8_t *qs, const float *wd, const float *wm, int N,
                     float *y);
int cortex_q8_matmul(const float *x, int M, int K, const int8_t *qs, const float *wd, int N, float *y);
int cortex_paged_attention(const float *q, const void *k, const void *v, const int64_t *tables, int width,
                           const int64_t *lengths, int B, int Hq, int Hkv, int D, int block, float scale, float *out,
                           int half);
void cortex_rope_store(const float *qkv, int T, int Hq, int Hkv, int D, const float *cos, const float *ssin,
                       const int64_t *slots, void *k_pool, void *v_pool, float *q_out, int half);
void cortex_rms_norm(const float *x, int M, int D, const float *w, float eps, float *out);
void cortex_add_rms_norm(const float *x, const float *delta, int M, int D, const float *w, float eps, float *sum,
                         float *out);
void cortex_swiglu(const float *gu, int M, int I, float *out);

#endif
