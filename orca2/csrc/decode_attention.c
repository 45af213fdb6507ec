/* Decode attention over the local engine's slot buffers (orca2.engine, loaded through orca2.native).
 *
 * One new query token per sequence, over that sequence's own keys only: row b reads lengths[b] keys of its slot,
 * not the batch's longest span. Keys and values are read in the model's dtype (fp32, or bf16 widened to fp32 on
 * load, which is exact) and everything is computed in fp32: the same numbers as fp32 buffers, at half the reads.
 * Each (row, kv head) is computed whole by one thread, in an order that depends on its own length only: a row's
 * output is the same bit for bit whatever the batch, the slot count or the thread count (the engine's layout
 * invariance).
 *
 * Layouts, contiguous:
 *   q, out   fp32 (rows, kv_heads * group, dim)            query head h * group + g reads kv head h
 *   k, v     fp32 or bf16 (slots >= rows, kv_heads, width, dim)   the engine's per-layer buffers
 *   lengths  int64 (rows,)                                 keys valid per row (its position + 1)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float same(float x) { return x; }

static inline float widen(uint16_t x) {
    const uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* One (row, kv head): `group` queries over n keys and values. */
#define ONE(NAME, T, LOAD)                                                                                        \
    static void NAME(const float *q, const T *k, const T *v, float *out, float *scores, int64_t n, int64_t group, \
                     int64_t dim, float scale) {                                                                  \
        for (int64_t g = 0; g < group; g++) {                                                                     \
            const float *qg = q + g * dim;                                                                        \
            float *s = scores + g * n;                                                                            \
            float top = -INFINITY;                                                                                \
            for (int64_t j = 0; j < n; j++) {                                                                     \
                const T *kj = k + j * dim;                                                                        \
                float dot = 0.0f;                                                                                 \
                for (int64_t d = 0; d < dim; d++) dot += qg[d] * LOAD(kj[d]);                                     \
                s[j] = dot * scale;                                                                               \
                top = s[j] > top ? s[j] : top;                                                                    \
            }                                                                                                     \
            float total = 0.0f;                                                                                   \
            for (int64_t j = 0; j < n; j++) {                                                                     \
                s[j] = expf(s[j] - top);                                                                          \
                total += s[j];                                                                                    \
            }                                                                                                     \
            float *o = out + g * dim;                                                                             \
            for (int64_t d = 0; d < dim; d++) o[d] = 0.0f;                                                        \
            for (int64_t j = 0; j < n; j++) {                                                                     \
                const T *vj = v + j * dim;                                                                        \
                const float p = s[j];                                                                             \
                for (int64_t d = 0; d < dim; d++) o[d] += p * LOAD(vj[d]);                                        \
            }                                                                                                     \
            const float inv = 1.0f / total;                                                                       \
            for (int64_t d = 0; d < dim; d++) o[d] *= inv;                                                        \
        }                                                                                                         \
    }

ONE(one_f32, float, same)
ONE(one_bf16, uint16_t, widen)

/* Returns 0, or 1 where a row had no keys or a thread had no memory for its scores. bf16: 1 for bf16 buffers. */
int orca2_decode_attention(const float *q, const void *k, const void *v, const int64_t *lengths, float *out,
                           int64_t rows, int64_t kv_heads, int64_t group, int64_t width, int64_t dim, float scale,
                           int bf16, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * group * width); /* every thread meets the loop, even without it */
#pragma omp for schedule(static)
        for (int64_t item = 0; item < rows * kv_heads; item++) {
            const int64_t b = item / kv_heads, h = item % kv_heads;
            const int64_t n = lengths[b] < width ? lengths[b] : width;
            const int64_t cache = (b * kv_heads + h) * width * dim, head = item * group * dim;
            if (scores == NULL || n < 1)
                failed = 1;
            else if (bf16)
                one_bf16(q + head, (const uint16_t *)k + cache, (const uint16_t *)v + cache, out + head, scores, n,
                         group, dim, scale);
            else
                one_f32(q + head, (const float *)k + cache, (const float *)v + cache, out + head, scores, n, group,
                        dim, scale);
        }
        free(scores);
    }
    return failed;
}
