/* The engine's numeric kernels (see kernels.h). wasm SIMD is 128-bit and has no FMA in clang 14, so the GEMM
 * keeps a 4x8 block of C in eight f32x4 registers and streams a packed 8-column panel of B past it. */
#include "kernels.h"

#include <math.h>
#include <wasm_simd128.h>

#define V(x) wasm_f32x4_splat(x)
#define ADD wasm_f32x4_add
#define MUL wasm_f32x4_mul
#define LOAD(p) wasm_v128_load(p)
#define STORE(p, v) wasm_v128_store(p, v)
/* acc += x * y (two roundings: there is no fused multiply-add to ask for). */
#define MAC(acc, x, y) (acc) = ADD((acc), MUL((x), (y)))

/* ------------------------------------------------------------------------------------------------ packing */

void pack_transposed(const float *s, int n, int k, int ld, float *dst) {
    for (int p = 0; p < n; p += NR) {
        int w = n - p < NR ? n - p : NR;
        for (int kk = 0; kk < k; kk++) {
            float *d = dst + (size_t)kk * NR;
            for (int j = 0; j < w; j++) d[j] = s[(size_t)(p + j) * ld + kk];
            for (int j = w; j < NR; j++) d[j] = 0.0f;
        }
        dst += (size_t)k * NR;
    }
}

void pack_plain(const float *s, int k, int n, int ld, float *dst) {
    for (int p = 0; p < n; p += NR) {
        int w = n - p < NR ? n - p : NR;
        for (int kk = 0; kk < k; kk++) {
            const float *row = s + (size_t)kk * ld + p;
            float *d = dst + (size_t)kk * NR;
            if (w == NR) {
                STORE(d, LOAD(row));
                STORE(d + 4, LOAD(row + 4));
            } else {
                for (int j = 0; j < w; j++) d[j] = row[j];
                for (int j = w; j < NR; j++) d[j] = 0.0f;
            }
        }
        dst += (size_t)k * NR;
    }
}

/* ------------------------------------------------------------------------------------------------ GEMM */

/* Blocking: a strip of 4 rows of A is packed k-major ([k][4]: one vector load gives the 4 rows' values at k) for
 * KC values of k at a time; MC rows of it (MC x KC floats, 128 KiB) stay in L2 while each panel's KC x 8 slice
 * (16 KiB) stays in L1 for all the strips. */
#define MR 4
#define KC 512
#define MC 64
static float a_packed[MC * KC];

/* One row of a C tile: acc (8 columns, w of them real) + bias, + residual, stored. */
static inline void finish_row(float *c, v128_t lo, v128_t hi, const float *bias, const float *r, int w) {
    if (w == NR) {
        if (bias) {
            lo = ADD(lo, LOAD(bias));
            hi = ADD(hi, LOAD(bias + 4));
        }
        if (r) {
            lo = ADD(lo, LOAD(r));
            hi = ADD(hi, LOAD(r + 4));
        }
        STORE(c, lo);
        STORE(c + 4, hi);
        return;
    }
    float t[NR];
    STORE(t, lo);
    STORE(t + 4, hi);
    for (int j = 0; j < w; j++) {
        float v = t[j];
        if (bias) v += bias[j];
        if (r) v += r[j];
        c[j] = v;
    }
}

/* The partial sums of a C row from an earlier slice of k (w columns real). */
static inline void load_row(const float *c, v128_t *lo, v128_t *hi, int w) {
    if (w == NR) {
        *lo = LOAD(c);
        *hi = LOAD(c + 4);
        return;
    }
    float t[NR] = {0};
    for (int j = 0; j < w; j++) t[j] = c[j];
    *lo = LOAD(t);
    *hi = LOAD(t + 4);
}

#define LANE(v, i) wasm_i32x4_shuffle((v), (v), i, i, i, i)

/* C[4, w] (+)= packed strip ap [kc][4] · panel slice b [kc][8]; bias and residual on the last slice of k. */
__attribute__((noinline)) static void kernel_4x8(int kc, const float *ap, const float *b, int accumulate,
                                                 const float *bias, const float *r, int ldr, float *c, int ldc,
                                                 int w) {
    v128_t c00, c01, c10, c11, c20, c21, c30, c31;
    if (accumulate) {
        load_row(c, &c00, &c01, w);
        load_row(c + ldc, &c10, &c11, w);
        load_row(c + 2 * ldc, &c20, &c21, w);
        load_row(c + 3 * ldc, &c30, &c31, w);
    } else {
        c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = V(0.0f);
    }
    for (int kk = 0; kk < kc; kk++, ap += MR, b += NR) {
        v128_t b0 = LOAD(b), b1 = LOAD(b + 4), a = LOAD(ap), x;
        x = LANE(a, 0);
        MAC(c00, x, b0);
        MAC(c01, x, b1);
        x = LANE(a, 1);
        MAC(c10, x, b0);
        MAC(c11, x, b1);
        x = LANE(a, 2);
        MAC(c20, x, b0);
        MAC(c21, x, b1);
        x = LANE(a, 3);
        MAC(c30, x, b0);
        MAC(c31, x, b1);
    }
    finish_row(c, c00, c01, bias, r, w);
    finish_row(c + ldc, c10, c11, bias, r ? r + ldr : 0, w);
    finish_row(c + 2 * ldc, c20, c21, bias, r ? r + 2 * ldr : 0, w);
    finish_row(c + 3 * ldc, c30, c31, bias, r ? r + 3 * ldr : 0, w);
}

/* C[1, 32] of row a against four consecutive full panels b (each k * NR floats). */
__attribute__((noinline)) static void kernel_1x32(int k, const float *a, const float *b, const float *bias,
                                                  const float *r, float *c) {
    const float *p0 = b, *p1 = b + (size_t)k * NR, *p2 = b + (size_t)2 * k * NR, *p3 = b + (size_t)3 * k * NR;
    v128_t c0 = V(0), c1 = V(0), c2 = V(0), c3 = V(0), c4 = V(0), c5 = V(0), c6 = V(0), c7 = V(0);
    for (int kk = 0; kk < k; kk++, p0 += NR, p1 += NR, p2 += NR, p3 += NR) {
        v128_t x = V(a[kk]);
        MAC(c0, x, LOAD(p0));
        MAC(c1, x, LOAD(p0 + 4));
        MAC(c2, x, LOAD(p1));
        MAC(c3, x, LOAD(p1 + 4));
        MAC(c4, x, LOAD(p2));
        MAC(c5, x, LOAD(p2 + 4));
        MAC(c6, x, LOAD(p3));
        MAC(c7, x, LOAD(p3 + 4));
    }
    finish_row(c, c0, c1, bias, r, NR);
    finish_row(c + 8, c2, c3, bias ? bias + 8 : 0, r ? r + 8 : 0, NR);
    finish_row(c + 16, c4, c5, bias ? bias + 16 : 0, r ? r + 16 : 0, NR);
    finish_row(c + 24, c6, c7, bias ? bias + 24 : 0, r ? r + 24 : 0, NR);
}

/* C[1, w] of row a against one packed panel b. */
__attribute__((noinline)) static void kernel_1x8(int k, const float *a, const float *b, const float *bias,
                                                 const float *r, float *c, int w) {
    v128_t c0 = V(0), c1 = V(0);
    for (int kk = 0; kk < k; kk++, b += NR) {
        v128_t x = V(a[kk]);
        MAC(c0, x, LOAD(b));
        MAC(c1, x, LOAD(b + 4));
    }
    finish_row(c, c0, c1, bias, r, w);
}

/* Rows [i0, i0 + rows) of A, columns [k0, k0 + kc), into a_packed as strips of [kc][4]. */
static void pack_a(const float *a, int lda, int i0, int rows, int k0, int kc) {
    float *d = a_packed;
    for (int i = i0; i < i0 + rows; i += MR, d += (size_t)kc * MR) {
        const float *r0 = a + (size_t)i * lda + k0, *r1 = r0 + lda, *r2 = r1 + lda, *r3 = r2 + lda;
        int kk = 0;
        for (; kk + 4 <= kc; kk += 4) { /* 4x4 transpose */
            v128_t x0 = LOAD(r0 + kk), x1 = LOAD(r1 + kk), x2 = LOAD(r2 + kk), x3 = LOAD(r3 + kk);
            v128_t t0 = wasm_i32x4_shuffle(x0, x1, 0, 4, 1, 5), t1 = wasm_i32x4_shuffle(x2, x3, 0, 4, 1, 5);
            v128_t t2 = wasm_i32x4_shuffle(x0, x1, 2, 6, 3, 7), t3 = wasm_i32x4_shuffle(x2, x3, 2, 6, 3, 7);
            STORE(d + kk * MR, wasm_i64x2_shuffle(t0, t1, 0, 2));
            STORE(d + kk * MR + 4, wasm_i64x2_shuffle(t0, t1, 1, 3));
            STORE(d + kk * MR + 8, wasm_i64x2_shuffle(t2, t3, 0, 2));
            STORE(d + kk * MR + 12, wasm_i64x2_shuffle(t2, t3, 1, 3));
        }
        for (; kk < kc; kk++) {
            d[kk * MR] = r0[kk];
            d[kk * MR + 1] = r1[kk];
            d[kk * MR + 2] = r2[kk];
            d[kk * MR + 3] = r3[kk];
        }
    }
}

void gemm(int m, int n, int k, const float *a, int lda, const float *bp, const float *bias, const float *r, int ldr,
          float *c, int ldc) {
    int panels = (n + NR - 1) / NR;
    size_t panel_floats = (size_t)k * NR;
    int m4 = m & ~(MR - 1);
    for (int k0 = 0; k0 < k; k0 += KC) {
        int kc = k - k0 < KC ? k - k0 : KC, last = k0 + kc == k;
        for (int i0 = 0; i0 < m4; i0 += MC) {
            int rows = m4 - i0 < MC ? m4 - i0 : MC;
            pack_a(a, lda, i0, rows, k0, kc);
            for (int p = 0; p < panels; p++) {
                int j = p * NR, w = n - j < NR ? n - j : NR;
                const float *b = bp + (size_t)p * panel_floats + (size_t)k0 * NR;
                for (int i = 0; i < rows; i += MR)
                    kernel_4x8(kc, a_packed + (size_t)i * kc, b, k0 > 0, last && bias ? bias + j : 0,
                               last && r ? r + (size_t)(i0 + i) * ldr + j : 0, ldr, c + (size_t)(i0 + i) * ldc + j,
                               ldc, w);
            }
        }
    }
    for (int i = m4; i < m; i++) {
        const float *ai = a + (size_t)i * lda;
        const float *ri = r ? r + (size_t)i * ldr : 0;
        float *ci = c + (size_t)i * ldc;
        int p = 0;
        for (; (p + 4) * NR <= n; p += 4)
            kernel_1x32(k, ai, bp + (size_t)p * panel_floats, bias ? bias + p * NR : 0, ri ? ri + p * NR : 0,
                        ci + p * NR);
        for (; p < panels; p++) {
            int j = p * NR, w = n - j < NR ? n - j : NR;
            kernel_1x8(k, ai, bp + (size_t)p * panel_floats, bias ? bias + j : 0, ri ? ri + j : 0, ci + j, w);
        }
    }
}

/* ------------------------------------------------------------------------------------------------ exp */

/* exp(hi + lo) for four lanes, where hi is exact and |lo| is small: Cephes' expf (range reduction by n·ln2 in two
 * parts, degree-7 polynomial), within 2 ulp. hi - n·ln2_hi is exact, so lo keeps its bits even when hi is large
 * (GELU's -x²/2). 2^n is applied as two factors so that subnormal results and overflow to inf stay right. */
static inline v128_t vexp_sum(v128_t hi, v128_t lo) {
    /* pmin/pmax are single SSE instructions (wasm's min/max are not) and keep NaN: (NaN < c) is false */
    hi = wasm_f32x4_pmax(wasm_f32x4_pmin(hi, V(88.8f)), V(-104.0f));
    /* n = round(x / ln2) by the 1.5 * 2^23 trick: the addition rounds, the low mantissa bits hold n */
    v128_t shifted = ADD(MUL(ADD(hi, lo), V(1.44269504088896341f)), V(12582912.0f));
    v128_t n = wasm_f32x4_sub(shifted, V(12582912.0f));
    v128_t ni = wasm_i32x4_sub(shifted, wasm_i32x4_splat(0x4B400000));
    v128_t t = ADD(wasm_f32x4_sub(hi, MUL(n, V(0.693359375f))), lo);
    t = wasm_f32x4_sub(t, MUL(n, V(-2.12194440e-4f)));
    v128_t p = V(1.9875691500e-4f);
    p = ADD(MUL(p, t), V(1.3981999507e-3f));
    p = ADD(MUL(p, t), V(8.3334519073e-3f));
    p = ADD(MUL(p, t), V(4.1665795894e-2f));
    p = ADD(MUL(p, t), V(1.6666665459e-1f));
    p = ADD(MUL(p, t), V(5.0000001201e-1f));
    p = ADD(ADD(MUL(MUL(p, t), t), t), V(1.0f));
    v128_t n1 = wasm_i32x4_shr(ni, 1), n2 = wasm_i32x4_sub(ni, n1);
    v128_t s1 = wasm_i32x4_shl(wasm_i32x4_add(n1, wasm_i32x4_splat(127)), 23);
    v128_t s2 = wasm_i32x4_shl(wasm_i32x4_add(n2, wasm_i32x4_splat(127)), 23);
    return MUL(MUL(p, s1), s2);
}

static inline v128_t vexp(v128_t x) { return vexp_sum(x, V(0.0f)); }

/* Scalar twin of vexp for tails, so a value's result does not depend on where it sits in a row. */
static inline float sexp(float x) {
    float out[4];
    STORE(out, vexp(V(x)));
    return out[0];
}

/* ------------------------------------------------------------------------------------------------ activations */

void relu(float *x, size_t n) {
    size_t i = 0;
    for (; i + 4 <= n; i += 4) STORE(x + i, wasm_f32x4_pmax(LOAD(x + i), V(0.0f))); /* x < 0 ? 0 : x, NaN kept */
    for (; i < n; i++) x[i] = x[i] < 0.0f ? 0.0f : x[i];
}

void tanh_inplace(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] = tanhf(x[i]);
}

/* 1 / (1 + exp(-x)), as torch computes it. */
void sigmoid(float *x, size_t n) {
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        v128_t e = vexp(wasm_f32x4_neg(LOAD(x + i)));
        STORE(x + i, wasm_f32x4_div(V(1.0f), ADD(V(1.0f), e)));
    }
    for (; i < n; i++) x[i] = 1.0f / (1.0f + sexp(-x[i]));
}

/* Exact GELU, x * Phi(x) with Phi(x) = erfc(-x / sqrt 2) / 2, torch's x * 0.5 * (1 + erf(x / sqrt 2)) to within
 * 1e-6 relative everywhere (also in the negative tail, where 1 + erf cancels). erfc(z), z >= 0, is Numerical
 * Recipes' Chebyshev fit t * exp(-z² + P(t)), t = 1 / (1 + z/2), fractional error < 1.2e-7; -z² = -x²/2 is
 * split into an exact part (x with its low 12 bits cleared, squared) and a small rest for vexp_sum. */
static inline v128_t vgelu(v128_t x) {
    v128_t ax = wasm_f32x4_abs(x), z = MUL(ax, V(0.70710678118654752440f));
    v128_t t = wasm_f32x4_div(V(1.0f), ADD(V(1.0f), MUL(V(0.5f), z)));
    v128_t p = V(0.17087277f);
    p = ADD(MUL(p, t), V(-0.82215223f));
    p = ADD(MUL(p, t), V(1.48851587f));
    p = ADD(MUL(p, t), V(-1.13520398f));
    p = ADD(MUL(p, t), V(0.27886807f));
    p = ADD(MUL(p, t), V(-0.18628806f));
    p = ADD(MUL(p, t), V(0.09678418f));
    p = ADD(MUL(p, t), V(0.37409196f));
    p = ADD(MUL(p, t), V(1.00002368f));
    p = ADD(MUL(p, t), V(-1.26551223f));
    v128_t xh = wasm_v128_and(ax, wasm_i32x4_splat((int32_t)0xfffff000u));
    v128_t hi = MUL(MUL(xh, xh), V(-0.5f));                                          /* exact */
    v128_t lo = wasm_f32x4_sub(p, MUL(MUL(wasm_f32x4_sub(ax, xh), ADD(ax, xh)), V(0.5f))); /* P - (x² - xh²)/2 */
    v128_t half_erfc = MUL(MUL(t, vexp_sum(hi, lo)), V(0.5f));                        /* Phi(-|x|) */
    v128_t phi = wasm_v128_bitselect(half_erfc, wasm_f32x4_sub(V(1.0f), half_erfc), wasm_f32x4_lt(x, V(0.0f)));
    return MUL(x, phi);
}

void gelu_erf(float *x, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) { /* two independent vectors in flight: the polynomials are long dependency chains */
        v128_t a = vgelu(LOAD(x + i)), b = vgelu(LOAD(x + i + 4));
        STORE(x + i, a);
        STORE(x + i + 4, b);
    }
    for (; i + 4 <= n; i += 4) STORE(x + i, vgelu(LOAD(x + i)));
    if (i < n) {
        float tail[4] = {0};
        for (size_t j = i; j < n; j++) tail[j - i] = x[j];
        STORE(tail, vgelu(LOAD(tail)));
        for (size_t j = i; j < n; j++) x[j] = tail[j - i];
    }
}

/* 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))), torch's approximate="tanh". */
void gelu_tanh(float *x, size_t n) {
    const float beta = 0.79788456080286535588f, kappa = 0.044715f;
    for (size_t i = 0; i < n; i++) {
        float v = x[i], cube = v * v * v;
        x[i] = 0.5f * v * (1.0f + tanhf(beta * (v + kappa * cube)));
    }
}

/* ------------------------------------------------------------------------------------------------ row ops */

static inline float hsum(v128_t v) {
    return (wasm_f32x4_extract_lane(v, 0) + wasm_f32x4_extract_lane(v, 1)) +
           (wasm_f32x4_extract_lane(v, 2) + wasm_f32x4_extract_lane(v, 3));
}

void softmax_row(float *x, int n, float scale) {
    int i = 0;
    v128_t vs = V(scale), vm = V(-INFINITY);
    for (; i + 4 <= n; i += 4) {
        v128_t v = MUL(LOAD(x + i), vs);
        STORE(x + i, v);
        vm = wasm_f32x4_max(vm, v);
    }
    float m = fmaxf(fmaxf(wasm_f32x4_extract_lane(vm, 0), wasm_f32x4_extract_lane(vm, 1)),
                    fmaxf(wasm_f32x4_extract_lane(vm, 2), wasm_f32x4_extract_lane(vm, 3)));
    for (; i < n; i++) {
        x[i] *= scale;
        m = fmaxf(m, x[i]);
    }
    v128_t vsum = V(0.0f);
    float tail = 0.0f;
    vm = V(m);
    for (i = 0; i + 4 <= n; i += 4) {
        v128_t e = vexp(wasm_f32x4_sub(LOAD(x + i), vm));
        STORE(x + i, e);
        vsum = ADD(vsum, e);
    }
    for (; i < n; i++) {
        x[i] = sexp(x[i] - m);
        tail += x[i];
    }
    float sum = hsum(vsum) + tail;
    v128_t vd = V(sum);
    for (i = 0; i + 4 <= n; i += 4) STORE(x + i, wasm_f32x4_div(LOAD(x + i), vd));
    for (; i < n; i++) x[i] /= sum;
}

void layer_norm(float *x, int rows, int h, const float *g, const float *b, float eps) {
    for (int row = 0; row < rows; row++, x += h) {
        int i = 0;
        v128_t vs = V(0.0f);
        float tail = 0.0f;
        for (; i + 4 <= h; i += 4) vs = ADD(vs, LOAD(x + i));
        for (; i < h; i++) tail += x[i];
        float mean = (hsum(vs) + tail) / (float)h;
        v128_t vmean = V(mean), vq = V(0.0f);
        tail = 0.0f;
        for (i = 0; i + 4 <= h; i += 4) {
            v128_t d = wasm_f32x4_sub(LOAD(x + i), vmean);
            MAC(vq, d, d);
        }
        for (; i < h; i++) tail += (x[i] - mean) * (x[i] - mean);
        float var = (hsum(vq) + tail) / (float)h;
        float rstd = 1.0f / sqrtf(var + eps);
        /* torch's LayerNorm kernel: (x * rstd + (-rstd * mean)) * gamma + beta */
        float shift = -rstd * mean;
        v128_t vr = V(rstd), vsh = V(shift);
        for (i = 0; i + 4 <= h; i += 4)
            STORE(x + i, ADD(MUL(ADD(MUL(LOAD(x + i), vr), vsh), LOAD(g + i)), LOAD(b + i)));
        for (; i < h; i++) x[i] = (x[i] * rstd + shift) * g[i] + b[i];
    }
}

void add_into(float *dst, const float *src, size_t n) {
    size_t i = 0;
    for (; i + 4 <= n; i += 4) STORE(dst + i, ADD(LOAD(dst + i), LOAD(src + i)));
    for (; i < n; i++) dst[i] += src[i];
}
