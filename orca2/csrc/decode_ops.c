/* The small operations of the local engine's decode step (orca2.engine._Fused, loaded through orca2.native), each
 * one call where torch runs several small ops: at 64 rows torch spent ~12 ms a step in them, a tenth of the step.
 *
 * The bf16 operations round where a Llama-style model's own modules round under bf16 (transformers' RMSNorm, rotary
 * embedding and SiLU-gated MLP): every intermediate that torch holds as a bf16 tensor is rounded to bf16 here too,
 * to nearest even, and what torch computes in fp32 is computed in fp32. The rotary embedding is the same bit for bit;
 * the norm's fp32 mean of squares and SiLU's exp are summed and computed in another order than torch's, so a value can
 * round one bf16 step apart now and then (on SmolLM2, 64 greedy replies of 128 tokens came out the same).
 * The argmax is exact in both dtypes: the first largest value, or the first NaN (torch's rule).
 *
 * Every row is computed alone, by one thread, so a row's numbers do not depend on the batch (the engine's layout
 * invariance). Rows are contiguous; bf16 is passed as uint16_t.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

/* out[r] = w * bf16(x[r] * 1 / sqrt(mean(x[r]^2) + eps)): transformers' LlamaRMSNorm under bf16 (x, w, out bf16,
 * rows x dim). */
static inline void norm_row(const uint16_t *xr, const uint16_t *w, uint16_t *o, int64_t dim, float eps) {
    float squares = 0.0f;
    for (int64_t d = 0; d < dim; d++) squares += widen(xr[d]) * widen(xr[d]);
    const float scale = 1.0f / sqrtf(squares / (float)dim + eps);
    for (int64_t d = 0; d < dim; d++) o[d] = narrow(widen(w[d]) * round_bf16(widen(xr[d]) * scale));
}

void orca2_rms_norm(const uint16_t *x, const uint16_t *w, uint16_t *out, int64_t rows, int64_t dim, float eps,
                    int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) norm_row(x + r * dim, w, out + r * dim, dim, eps);
}

/* The residual add, then the next norm: x[r] = bf16(x[r] + delta[r]) in place (torch's bf16 add), then out[r] as
 * orca2_rms_norm gives it for the new x[r]. */
void orca2_add_rms_norm(uint16_t *x, const uint16_t *delta, const uint16_t *w, uint16_t *out, int64_t rows,
                        int64_t dim, float eps, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *xr = x + r * dim;
        const uint16_t *dr = delta + r * dim;
        for (int64_t d = 0; d < dim; d++) xr[d] = narrow(widen(xr[d]) + widen(dr[d]));
        norm_row(xr, w, out + r * dim, dim, eps);
    }
}

/* In place on each row's first `heads` heads of `dim` (a step's queries, then its keys, as one q/k/v product lays
 * them): x = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)), rotate_half(x) = (-x[dim/2:], x[:dim/2]), as
 * transformers' apply_rotary_pos_emb under bf16. x: rows of `stride` values; cos, sin: (rows, dim). */
void orca2_rope(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t rows, int64_t stride, int64_t heads,
                int64_t dim, int threads) {
    const int64_t half = dim / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *c = cos + r * dim, *s = sin + r * dim;
        for (int64_t h = 0; h < heads; h++) {
            uint16_t *v = x + r * stride + h * dim;
            float head[512]; /* dim <= 512, checked by the caller */
            for (int64_t d = 0; d < dim; d++) head[d] = widen(v[d]);
            for (int64_t d = 0; d < dim; d++) {
                const float turned = d < half ? -head[d + half] : head[d - half];
                v[d] = narrow(round_bf16(head[d] * widen(c[d])) + round_bf16(turned * widen(s[d])));
            }
        }
    }
}

/* out[r] = bf16(bf16(silu(gate)) * up) with (gate, up) the two halves of each row of x (rows x 2 * width): the
 * gated MLP's act_fn(gate_proj(x)) * up_proj(x) under bf16. */
void orca2_silu_mul(const uint16_t *x, uint16_t *out, int64_t rows, int64_t width, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *gate = x + r * 2 * width, *up = gate + width;
        uint16_t *o = out + r * width;
        for (int64_t d = 0; d < width; d++) {
            const float g = widen(gate[d]);
            /* where exp(-g) overflows torch's g / (1 + inf) is a signed zero; -ffast-math assumes no infinities */
            const float silu = -g > 88.0f ? copysignf(0.0f, g) : g / (1.0f + expf(-g));
            o[d] = narrow(round_bf16(silu) * widen(up[d]));
        }
    }
}

/* The first index of each row's largest value, or of its first NaN; x: rows x n, fp32 (bf16 = 0) or bf16. One pass
 * takes the maximum of each block of ARGMAX_BLOCK values; the first block that holds the row's maximum is then
 * searched. NaN is found from the bits (this file is built with -ffast-math, which assumes there is none). */
#define ARGMAX_BLOCK 512
#define ARGMAX(NAME, T, LOAD, IS_NAN)                                                                               \
    static int64_t NAME(const T *v, int64_t n) {                                                                    \
        float top = -INFINITY;                                                                                      \
        int64_t first = 0;                                                                                          \
        int nan = 0;                                                                                                \
        for (int64_t b = 0; b < n; b += ARGMAX_BLOCK) {                                                             \
            const int64_t end = b + ARGMAX_BLOCK < n ? b + ARGMAX_BLOCK : n;                                        \
            float most = -INFINITY;                                                                                 \
            for (int64_t j = b; j < end; j++) {                                                                     \
                nan |= IS_NAN(v[j]);                                                                                \
                const float f = LOAD(v[j]);                                                                         \
                most = f > most ? f : most;                                                                         \
            }                                                                                                       \
            if (most > top) {                                                                                       \
                top = most;                                                                                         \
                first = b;                                                                                          \
            }                                                                                                       \
        }                                                                                                           \
        if (nan) {                                                                                                  \
            for (int64_t j = 0; j < n; j++)                                                                         \
                if (IS_NAN(v[j])) return j;                                                                         \
        }                                                                                                           \
        for (int64_t j = first; j < n; j++)                                                                         \
            if (LOAD(v[j]) == top) return j;                                                                        \
        return 0; /* not reached: the block holds its maximum */                                                    \
    }

static inline float same(float x) { return x; }
static inline int nan_bf16(uint16_t x) { return (x & 0x7fff) > 0x7f80; }
static inline int nan_f32(float x) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (bits & 0x7fffffffu) > 0x7f800000u;
}

ARGMAX(argmax_bf16, uint16_t, widen, nan_bf16)
ARGMAX(argmax_f32, float, same, nan_f32)

void orca2_argmax(const void *x, int64_t rows, int64_t n, int bf16, int64_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        out[r] = bf16 ? argmax_bf16((const uint16_t *)x + r * n, n) : argmax_f32((const float *)x + r * n, n);
}
