/* The engine's numeric kernels: a packed, register-blocked f32x4 GEMM and the element-wise / row-wise ops of
 * an MLP and a BERT encoder. FP32 throughout; no allocation, no failure: the caller sizes every buffer. */
#ifndef WARMPOD_KERNELS_H
#define WARMPOD_KERNELS_H

#include <stddef.h>

/* Packed right-hand matrices are panels of NR consecutive output columns, k-major inside a panel
 * (panel p holds element (k, j) of columns p*NR .. p*NR+NR-1 at p*K*NR + k*NR + j), zero-padded past N. */
#define NR 8

static inline int round_up(int n, int to) { return (n + to - 1) / to * to; }

/* Floats a packed [K, N] right-hand matrix takes. */
static inline size_t packed_floats(int n, int k) { return (size_t)round_up(n, NR) * (size_t)k; }

/* Pack B = S^T where S is [N, K] row-major with leading dimension ld (a Linear weight [out, in], or attention keys). */
void pack_transposed(const float *s, int n, int k, int ld, float *dst);
/* Pack B = S where S is [K, N] row-major with leading dimension ld (attention values). */
void pack_plain(const float *s, int k, int n, int ld, float *dst);

/* C[M, N] = A[M, K] · B (+ bias[N]) (+ R[M, N]), A row-major (lda), B packed, C row-major (ldc), R (ldr).
 * The sum over k runs in order for each output, then the bias, then the residual: torch's addmm then add. */
void gemm(int m, int n, int k, const float *a, int lda, const float *bp, const float *bias, const float *r, int ldr,
          float *c, int ldc);

/* In-place element-wise activations over n floats. */
void relu(float *x, size_t n);
void tanh_inplace(float *x, size_t n);
void sigmoid(float *x, size_t n);
void gelu_erf(float *x, size_t n);
void gelu_tanh(float *x, size_t n);

/* In-place softmax of one row of n floats after multiplying by scale (max-subtracted, FP32). */
void softmax_row(float *x, int n, float scale);

/* In-place LayerNorm of rows [rows, h] (leading dimension h): (x - mean) / sqrt(var + eps) * g + b. */
void layer_norm(float *x, int rows, int h, const float *g, const float *b, float eps);

/* dst[i] += src[i] for n floats. */
void add_into(float *dst, const float *src, size_t n);

/* fmaxf (a NaN argument gives the other one; +0 over -0), inline: wasi-libc's fmaxf is a call, and every call is a
 * deadline check at the callee's entry. */
static inline float max_num(float a, float b) {
    if (a != a) return b;
    if (b != b) return a;
    if (__builtin_signbit(a) != __builtin_signbit(b)) return __builtin_signbit(a) ? b : a;
    return a < b ? b : a;
}

#endif
