/* Decode attention over the local engine's slot buffers (orca2.engine, loaded through orca2.native).
 *
 * One new query token per sequence, over that sequence's own keys only: row b reads lengths[b] keys of its slot,
 * not the batch's longest span. Keys and values are read in the model's dtype (fp32, or bf16 widened to fp32 as it
 * is read, which is exact) and everything is computed in fp32. Keys are held transposed, (dim, width) per slot and
 * head, so a score is built across 16 keys at once with no sum across lanes; values keep (width, dim).
 *
 * Each (row, kv head) is computed whole by one thread, in an order that depends on its own length only: a row's
 * output is the same bit for bit whatever the batch, the slot count or the thread count (the engine's layout
 * invariance).
 *
 * The step's new key and value of each row (its last, at lengths[b] - 1) are written into the buffers first, by the
 * thread that then reads them.
 *
 * Layouts, contiguous:
 *   q, out       fp32 (rows, kv_heads * group, dim)                 query head h * group + g reads kv head h
 *   knew, vnew   the buffers' dtype (rows, kv_heads, dim)           this step's keys and values (NULL: none to write)
 *   kt           fp32 or bf16 (slots >= rows, kv_heads, dim, width) keys, transposed
 *   v            fp32 or bf16 (slots >= rows, kv_heads, width, dim) values
 *   lengths      int64 (rows,)                                      keys valid per row (its position + 1)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 128   /* keys scored at once: 8 AVX-512 accumulators, summed along dim with no sum across lanes */
#define DIM_MAX 256 /* value dims summed at once (longer heads go in chunks of this many) */

static inline float same(float x) { return x; }

static inline float widen(uint16_t x) {
    const uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* One item, (row, kv head) number `item`: write its new key and value at n - 1 (if given), then `group` queries
 * over its n keys; the arguments are the whole buffers (as orca2_decode_attention takes them); scores: width floats
 * of scratch. */
#define ONE(NAME, T, LOAD)                                                                                          \
    static void NAME(const float *query, const void *knew_all, const void *vnew_all, void *kt_all, void *v_all,    \
                     float *out_all, float *scores, int64_t item, int64_t n, int64_t group, int64_t width,          \
                     int64_t dim, float scale) {                                                                    \
        const float *q = query + item * group * dim;                                                                \
        float *out = out_all + item * group * dim;                                                                  \
        T *kt = (T *)kt_all + item * width * dim, *v = (T *)v_all + item * width * dim;                             \
        if (knew_all != NULL) {                                                                                     \
            const T *knew = (const T *)knew_all + item * dim, *vnew = (const T *)vnew_all + item * dim;             \
            for (int64_t d = 0; d < dim; d++) {                                                                     \
                kt[d * width + n - 1] = knew[d];                                                                    \
                v[(n - 1) * dim + d] = vnew[d];                                                                     \
            }                                                                                                       \
        }                                                                                                           \
        for (int64_t g = 0; g < group; g++) {                                                                       \
            const float *qg = q + g * dim;                                                                          \
            for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {                                                             \
                const int64_t m = n - j0 < BLOCK ? n - j0 : BLOCK;                                                  \
                float acc[BLOCK] = {0};                                                                             \
                for (int64_t d = 0; d < dim; d++) {                                                                 \
                    const T *row = kt + d * width + j0;                                                             \
                    const float qd = qg[d];                                                                         \
                    for (int64_t j = 0; j < m; j++) acc[j] += qd * LOAD(row[j]);                                    \
                }                                                                                                   \
                for (int64_t j = 0; j < m; j++) scores[j0 + j] = acc[j] * scale;                                    \
            }                                                                                                       \
            float top = -INFINITY, total = 0.0f;                                                                    \
            for (int64_t j = 0; j < n; j++) top = scores[j] > top ? scores[j] : top;                                \
            for (int64_t j = 0; j < n; j++) {                                                                       \
                scores[j] = expf(scores[j] - top);                                                                  \
                total += scores[j];                                                                                 \
            }                                                                                                       \
            float *o = out + g * dim;                                                                               \
            for (int64_t d0 = 0; d0 < dim; d0 += DIM_MAX) {                                                         \
                const int64_t w = dim - d0 < DIM_MAX ? dim - d0 : DIM_MAX;                                          \
                float acc[DIM_MAX] = {0};                                                                           \
                for (int64_t j = 0; j < n; j++) {                                                                   \
                    const T *vj = v + j * dim + d0;                                                                 \
                    const float p = scores[j];                                                                      \
                    for (int64_t d = 0; d < w; d++) acc[d] += p * LOAD(vj[d]);                                      \
                }                                                                                                   \
                for (int64_t d = 0; d < w; d++) o[d0 + d] = acc[d] * (1.0f / total);                                \
            }                                                                                                       \
        }                                                                                                           \
    }

ONE(one_f32, float, same)
ONE(one_bf16, uint16_t, widen)

/* Returns 0, or 1 where a row had no keys or a thread had no memory for its scores. bf16: 1 for bf16 buffers. */
int orca2_decode_attention(const float *q, const void *knew, const void *vnew, void *kt, void *v,
                           const int64_t *lengths, float *out, int64_t rows, int64_t kv_heads, int64_t group,
                           int64_t width, int64_t dim, float scale, int bf16, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * width); /* every thread meets the loop, even without it */
#pragma omp for schedule(static)
        for (int64_t item = 0; item < rows * kv_heads; item++) { /* item = row * kv_heads + kv head */
            const int64_t b = item / kv_heads;
            const int64_t n = lengths[b] < width ? lengths[b] : width;
            if (scores == NULL || n < 1)
                failed = 1;
            else
                (bf16 ? one_bf16 : one_f32)(q, knew, vnew, kt, v, out, scores, item, n, group, width, dim, scale);
        }
        free(scores);
    }
    return failed;
}
