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
#define LANE(v, i) wasm_i32x4_shuffle((v), (v), i, i, i, i)

/* The deadline checks, and why the hot loops are unrolled.
 *
 * The host runs the engine under wasmtime's epoch interruption (the request deadline), which puts a check of the
 * epoch counter at every loop header and function entry. The check's slow path is a call into the runtime, across
 * which every vector register is caller-saved, so Cranelift keeps the vectors live around a loop's back-edge (a
 * GEMM's accumulators, a row sum) in stack slots and stores and reloads them at every iteration: with one k step per
 * iteration, a store-to-load round trip on every accumulator's dependency chain at every step, which more than
 * doubled the GEMM's time. So the loops that carry vectors run many steps per iteration: one check, and one store
 * and reload of what they carry, per KU steps (the GEMM's k loops) or CHUNK vectors (the row loops: softmax,
 * LayerNorm, and the light element-wise loops, where a check per vector would be a large share of the work; the
 * exp/erf-heavy element-wise loops carry nothing and are left one or two vectors per iteration).
 *
 * The GEMM's unrolled steps each end with their own exit test (`if (--k == 0) goto done`), which also handles
 * k % KU. It is there for a second reason: Cranelift computes pure arithmetic where a load, store or branch first
 * needs it, so without a branch after each step all KU steps' loads would run first and their multiply-adds after
 * them, with every loaded vector live at once (spilled); the exit branch needs the accumulators, so each step's
 * arithmetic stays in its step. The row loops' chunks are short enough for their loads to stay in registers.
 *
 * Also: vectors live across a loop or call other than the k loop (a tile's other rows while one is stored through
 * a loop) would be spilled for the whole function, the k loop included; the tile epilogues avoid that. */
#define KU 32
#define CHUNK 8

/* for (; i + 4 <= n; i += 4) STEP(i); with CHUNK vectors per loop iteration. STEP is the name of a one-argument
 * macro; i is the caller's index variable, left at the first element not done. */
#define ROW_LOOP(i, n, STEP)                                                                                        \
    do {                                                                                                            \
        for (; (i) + 4 * CHUNK <= (n); (i) += 4 * CHUNK) {                                                          \
            _Pragma("clang loop unroll(full)") for (int u_ = 0; u_ < 4 * CHUNK; u_ += 4) STEP((i) + u_);            \
        }                                                                                                           \
        for (; (i) + 4 <= (n); (i) += 4) STEP(i);                                                                   \
    } while (0)

/* ------------------------------------------------------------------------------------------------ packing */

void pack_transposed(const float *s, int n, int k, int ld, float *dst) {
    for (int p = 0; p < n; p += NR) {
        int w = n - p < NR ? n - p : NR;
        const float *col = s + (size_t)p * ld;
        for (int kk = 0; kk < k; kk++) {
            float *d = dst + (size_t)kk * NR;
            if (w == NR) { /* a constant trip count: unrolled, no loop (and no deadline check) per element */
                for (int j = 0; j < NR; j++) d[j] = col[(size_t)j * ld + kk];
            } else {
                for (int j = 0; j < w; j++) d[j] = col[(size_t)j * ld + kk];
                for (int j = w; j < NR; j++) d[j] = 0.0f;
            }
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

/* Blocking: a strip of 4 rows of A is packed k-major with every value splatted to a whole vector ([k][4][4]: the
 * kernel multiplies B's vectors by one load each, no lane shuffles, which would compete with the multiplies and adds
 * for the same SIMD ports) for KC values of k at a time; MC rows of it (MC x KC x 4 floats, 128 KiB) stay in L2 and
 * stream past each panel's KC x 8 slice (16 KiB), which stays in L1 for the MC / 4 strips. */
#define MR 4
#define KC 512
#define MC 16
static float a_packed[MC * KC * 4];

/* One full-width row of a C tile: acc + bias, + residual, stored. */
static inline void finish_row(float *c, v128_t lo, v128_t hi, const float *bias, const float *r) {
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
}

/* A C tile of `rows` rows and w < NR real columns goes through t [rows][NR] (whole vectors) and these loops, after
 * every accumulator is stored to t or before any is loaded from it: no vector is live across their loop headers
 * (see "The deadline checks"). */
static void partial_tile_in(const float *c, int ldc, int rows, int w, float *t) {
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < NR; j++) t[i * NR + j] = j < w ? c[(size_t)i * ldc + j] : 0.0f;
}

static void partial_tile_out(float *c, int ldc, int rows, int w, const float *t, const float *bias, const float *r,
                             int ldr) {
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < w; j++) {
            float v = t[i * NR + j];
            if (bias) v += bias[j];
            if (r) v += r[(size_t)i * ldr + j];
            c[(size_t)i * ldc + j] = v;
        }
}

/* C[4, w] (+)= packed strip ap [kc][4][4] · panel slice b [kc][8]; bias and residual on the last slice of k. */
__attribute__((noinline)) static void kernel_4x8(int kc, const float *ap, const float *b, int accumulate,
                                                 const float *bias, const float *r, int ldr, float *c, int ldc,
                                                 int w) {
    v128_t c00, c01, c10, c11, c20, c21, c30, c31;
    float t[MR * NR];
    if (accumulate) { /* the partial sums from an earlier slice of k */
        const float *src = c;
        int lds = ldc;
        if (w < NR) {
            partial_tile_in(c, ldc, MR, w, t);
            src = t;
            lds = NR;
        }
        c00 = LOAD(src);
        c01 = LOAD(src + 4);
        c10 = LOAD(src + lds);
        c11 = LOAD(src + lds + 4);
        c20 = LOAD(src + 2 * lds);
        c21 = LOAD(src + 2 * lds + 4);
        c30 = LOAD(src + 3 * lds);
        c31 = LOAD(src + 3 * lds + 4);
    } else {
        c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = V(0.0f);
    }
    if (kc > 0)
        for (;;) { /* KU steps per iteration, an exit after each: see "The deadline checks" */
#pragma clang loop unroll(full)
            for (int u = 0; u < KU; u++, ap += 4 * MR, b += NR) {
                v128_t b0 = LOAD(b), b1 = LOAD(b + 4), x;
                x = LOAD(ap);
                MAC(c00, x, b0);
                MAC(c01, x, b1);
                x = LOAD(ap + 4);
                MAC(c10, x, b0);
                MAC(c11, x, b1);
                x = LOAD(ap + 8);
                MAC(c20, x, b0);
                MAC(c21, x, b1);
                x = LOAD(ap + 12);
                MAC(c30, x, b0);
                MAC(c31, x, b1);
                if (--kc == 0) goto done;
            }
        }
done:
    if (w == NR) {
        finish_row(c, c00, c01, bias, r);
        finish_row(c + ldc, c10, c11, bias, r ? r + ldr : 0);
        finish_row(c + 2 * ldc, c20, c21, bias, r ? r + 2 * ldr : 0);
        finish_row(c + 3 * ldc, c30, c31, bias, r ? r + 3 * ldr : 0);
    } else {
        STORE(t, c00);
        STORE(t + 4, c01);
        STORE(t + NR, c10);
        STORE(t + NR + 4, c11);
        STORE(t + 2 * NR, c20);
        STORE(t + 2 * NR + 4, c21);
        STORE(t + 3 * NR, c30);
        STORE(t + 3 * NR + 4, c31);
        partial_tile_out(c, ldc, MR, w, t, bias, r, ldr);
    }
}

/* C[1, 24] of row a against three consecutive full panels b (each k * NR floats). Three, not four: a step's
 * loads all come before its arithmetic (see "The deadline checks"), and four panels' 8 loads + 8 accumulators + the
 * splat of a would need more than the 16 vector registers. */
__attribute__((noinline)) static void kernel_1x24(int k, const float *a, const float *b, const float *bias,
                                                  const float *r, float *c) {
    const float *p0 = b, *p1 = b + (size_t)k * NR, *p2 = b + (size_t)2 * k * NR;
    v128_t c0 = V(0), c1 = V(0), c2 = V(0), c3 = V(0), c4 = V(0), c5 = V(0);
    if (k > 0)
        for (;;) { /* KU steps per iteration, an exit after each: see "The deadline checks" */
#pragma clang loop unroll(full)
            for (int u = 0; u < KU; u++, a++, p0 += NR, p1 += NR, p2 += NR) {
                v128_t x = V(*a);
                MAC(c0, x, LOAD(p0));
                MAC(c1, x, LOAD(p0 + 4));
                MAC(c2, x, LOAD(p1));
                MAC(c3, x, LOAD(p1 + 4));
                MAC(c4, x, LOAD(p2));
                MAC(c5, x, LOAD(p2 + 4));
                if (--k == 0) goto done;
            }
        }
done:
    finish_row(c, c0, c1, bias, r);
    finish_row(c + 8, c2, c3, bias ? bias + 8 : 0, r ? r + 8 : 0);
    finish_row(c + 16, c4, c5, bias ? bias + 16 : 0, r ? r + 16 : 0);
}

/* C[1, w] of row a against one packed panel b. */
__attribute__((noinline)) static void kernel_1x8(int k, const float *a, const float *b, const float *bias,
                                                 const float *r, float *c, int w) {
    v128_t c0 = V(0), c1 = V(0);
    if (k > 0)
        for (;;) { /* KU steps per iteration, an exit after each: see "The deadline checks" */
#pragma clang loop unroll(full)
            for (int u = 0; u < KU; u++, a++, b += NR) {
                v128_t x = V(*a);
                MAC(c0, x, LOAD(b));
                MAC(c1, x, LOAD(b + 4));
                if (--k == 0) goto done;
            }
        }
done:
    if (w == NR) {
        finish_row(c, c0, c1, bias, r);
    } else {
        float t[NR];
        STORE(t, c0);
        STORE(t + 4, c1);
        partial_tile_out(c, 0, 1, w, t, bias, r, 0);
    }
}

/* Rows [i0, i0 + rows) of A, columns [k0, k0 + kc), into a_packed as strips of [kc][4][4] (each value splatted). */
static void pack_a(const float *a, int lda, int i0, int rows, int k0, int kc) {
    float *d = a_packed;
    for (int i = i0; i < i0 + rows; i += MR, d += (size_t)kc * MR * 4) {
        const float *r0 = a + (size_t)i * lda + k0, *r1 = r0 + lda, *r2 = r1 + lda, *r3 = r2 + lda;
        int kk = 0;
        for (; kk + 4 <= kc; kk += 4) { /* 4 values of k of the 4 rows, each splatted */
            v128_t x0 = LOAD(r0 + kk), x1 = LOAD(r1 + kk), x2 = LOAD(r2 + kk), x3 = LOAD(r3 + kk);
            float *o = d + (size_t)kk * MR * 4;
#define SPLATS(j)                                                                                                   \
    STORE(o + 16 * (j), LANE(x0, j));                                                                               \
    STORE(o + 16 * (j) + 4, LANE(x1, j));                                                                           \
    STORE(o + 16 * (j) + 8, LANE(x2, j));                                                                           \
    STORE(o + 16 * (j) + 12, LANE(x3, j))
            SPLATS(0);
            SPLATS(1);
            SPLATS(2);
            SPLATS(3);
#undef SPLATS
        }
        for (; kk < kc; kk++) {
            float *o = d + (size_t)kk * MR * 4;
            STORE(o, V(r0[kk]));
            STORE(o + 4, V(r1[kk]));
            STORE(o + 8, V(r2[kk]));
            STORE(o + 12, V(r3[kk]));
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
                    kernel_4x8(kc, a_packed + (size_t)i * kc * 4, b, k0 > 0, last && bias ? bias + j : 0,
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
        for (; (p + 3) * NR <= n; p += 3)
            kernel_1x24(k, ai, bp + (size_t)p * panel_floats, bias ? bias + p * NR : 0, ri ? ri + p * NR : 0,
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
#define STEP(j) STORE(x + (j), wasm_f32x4_pmax(LOAD(x + (j)), V(0.0f))) /* x < 0 ? 0 : x, NaN kept */
    ROW_LOOP(i, n, STEP);
#undef STEP
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
#define STEP(j)                                                                                                     \
    do {                                                                                                            \
        v128_t v = MUL(LOAD(x + (j)), vs);                                                                          \
        STORE(x + (j), v);                                                                                          \
        vm = wasm_f32x4_max(vm, v);                                                                                 \
    } while (0)
    ROW_LOOP(i, n, STEP);
#undef STEP
    float m = max_num(max_num(wasm_f32x4_extract_lane(vm, 0), wasm_f32x4_extract_lane(vm, 1)),
              max_num(wasm_f32x4_extract_lane(vm, 2), wasm_f32x4_extract_lane(vm, 3)));
    for (; i < n; i++) {
        x[i] *= scale;
        m = max_num(m, x[i]);
    }
    v128_t vsum = V(0.0f);
    float tail = 0.0f;
    vm = V(m);
    i = 0;
#define STEP(j)                                                                                                     \
    do {                                                                                                            \
        v128_t e = vexp(wasm_f32x4_sub(LOAD(x + (j)), vm));                                                         \
        STORE(x + (j), e);                                                                                          \
        vsum = ADD(vsum, e);                                                                                        \
    } while (0)
    ROW_LOOP(i, n, STEP);
#undef STEP
    for (; i < n; i++) {
        x[i] = sexp(x[i] - m);
        tail += x[i];
    }
    float sum = hsum(vsum) + tail;
    v128_t vd = V(sum);
    i = 0;
#define STEP(j) STORE(x + (j), wasm_f32x4_div(LOAD(x + (j)), vd))
    ROW_LOOP(i, n, STEP);
#undef STEP
    for (; i < n; i++) x[i] /= sum;
}

void layer_norm(float *x, int rows, int h, const float *g, const float *b, float eps) {
    for (int row = 0; row < rows; row++, x += h) {
        int i = 0;
        v128_t vs = V(0.0f);
        float tail = 0.0f;
#define STEP(j) vs = ADD(vs, LOAD(x + (j)))
        ROW_LOOP(i, h, STEP);
#undef STEP
        for (; i < h; i++) tail += x[i];
        float mean = (hsum(vs) + tail) / (float)h;
        v128_t vmean = V(mean), vq = V(0.0f);
        tail = 0.0f;
        i = 0;
#define STEP(j)                                                                                                     \
    do {                                                                                                            \
        v128_t d = wasm_f32x4_sub(LOAD(x + (j)), vmean);                                                            \
        MAC(vq, d, d);                                                                                              \
    } while (0)
        ROW_LOOP(i, h, STEP);
#undef STEP
        for (; i < h; i++) tail += (x[i] - mean) * (x[i] - mean);
        float var = (hsum(vq) + tail) / (float)h;
        float rstd = 1.0f / sqrtf(var + eps);
        /* torch's LayerNorm kernel: (x * rstd + (-rstd * mean)) * gamma + beta */
        float shift = -rstd * mean;
        v128_t vr = V(rstd), vsh = V(shift);
        i = 0;
#define STEP(j) STORE(x + (j), ADD(MUL(ADD(MUL(LOAD(x + (j)), vr), vsh), LOAD(g + (j))), LOAD(b + (j))))
        ROW_LOOP(i, h, STEP);
#undef STEP
        for (; i < h; i++) x[i] = (x[i] * rstd + shift) * g[i] + b[i];
    }
}

void add_into(float *dst, const float *src, size_t n) {
    size_t i = 0;
#define STEP(j) STORE(dst + (j), ADD(LOAD(dst + (j)), LOAD(src + (j))))
    ROW_LOOP(i, n, STEP);
#undef STEP
    for (; i < n; i++) dst[i] += src[i];
}
