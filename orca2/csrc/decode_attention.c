/* Decode attention over the local engine's slot buffers (orca2.engine, loaded through orca2.native).
 *
 * One new query token per sequence, over that sequence's own keys only: row b uses lengths[b] keys of its slot,
 * not the batch's longest span. Keys and values are read in the model's dtype (fp32, or bf16 widened to fp32 as it
 * is read, which is exact) and everything is computed in fp32.
 *
 * Written with the compiler's vector extensions (GCC >= 9, Clang): VEC floats a register, which -march=native maps
 * to AVX-512, or AVX2 / SSE in halves. Accumulators stay in registers:
 *   scores  keys are held in blocks of PITCH (64) positions, each block transposed, (dim, PITCH), so 16 keys are
 *           scored at once along dim with no sum across lanes (a block is 4 independent accumulators per query),
 *           and a block is one run of memory (8 KB in bf16 at dim 64), read front to back while the next one is
 *           fetched ahead. Blocks are read whole (orca2.native.key_buffer): the scores of keys past a row's length
 *           are computed from whatever memory lies there and thrown away unused.
 *   values  (width, dim) per slot and head; a head of dim <= 128 (a multiple of 16) sums its weighted values in
 *           registers, two keys at a time into two sets of accumulators; other heads take a plain loop.
 *
 * Each (row, kv head) is computed whole by one thread, in an order that depends on its own length only: a row's
 * output is the same bit for bit whatever the batch, the slot count, the buffer width or the thread count (the
 * engine's layout invariance).
 *
 * The step's new key and value of each row (its last, at lengths[b] - 1) are written into the buffers first, by the
 * thread that then reads them.
 *
 * Layouts:
 *   q, out       fp32 (rows, kv_heads * group, dim)                 query head h * group + g reads kv head h
 *   knew, vnew   the buffers' dtype (rows, kv_heads, dim)           this step's keys and values (NULL: none to write)
 *   kt           fp32 or bf16 (slots >= rows, kv_heads, pitch / PITCH, dim, PITCH) keys, in transposed blocks
 *   v            fp32 or bf16 (slots >= rows, kv_heads, width, dim) values
 *   lengths      int64 (rows,)                                      keys used per row (its position + 1), <= width
 *   slots        int64 (rows,), or NULL: row b reads slot b         the slot each row reads (a prefill's queries of one
 *                                                                   prompt all read its slot; then knew is NULL)
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#define LANES 16    /* floats in a VEC */
#define PITCH 64    /* keys per block (4 VECs); a slot's keys are whole blocks */
#define DIM_MAX 256 /* value dims a plain-loop head sums at once (longer heads go in chunks of this many) */

typedef float VEC __attribute__((vector_size(LANES * sizeof(float))));
typedef uint32_t WORDS __attribute__((vector_size(LANES * sizeof(uint32_t))));

#define INLINE static inline __attribute__((always_inline))

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "bf16 pairs are split as little-endian words" /* the build fails: the engine attends with torch instead */
#endif

#if defined(__clang__) || __GNUC__ >= 12
#define ZIP_LO(a, b) __builtin_shufflevector(a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23)
#define ZIP_HI(a, b) __builtin_shufflevector(a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31)
#else
typedef int32_t INDEX __attribute__((vector_size(LANES * sizeof(int32_t))));
#define ZIP_LO(a, b) __builtin_shuffle(a, b, (INDEX){0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23})
#define ZIP_HI(a, b) __builtin_shuffle(a, b, (INDEX){8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31})
#endif

INLINE VEC load(const float *p) {
    VEC x;
    memcpy(&x, p, sizeof x);
    return x;
}

INLINE void store(float *p, VEC x) { memcpy(p, &x, sizeof x); }

/* 32 values at p as two VECs, and back: for fp32 the first 16 and the next 16; for bf16 the even-numbered and the
 * odd-numbered ones (a bf16 is the top half of its float, so one load and one mask or shift per 16 values widens
 * them exactly). Products and sums are lane by lane, so either split gives the same numbers once stored back. */
INLINE void load2_float(const float *p, VEC *a, VEC *b) {
    *a = load(p);
    *b = load(p + LANES);
}

INLINE void store2_float(float *p, VEC a, VEC b) {
    store(p, a);
    store(p + LANES, b);
}

INLINE void load2_bf16(const uint16_t *p, VEC *even, VEC *odd) {
    WORDS w;
    memcpy(&w, p, sizeof w);
    const WORDS lo = w << 16, hi = w & 0xFFFF0000u;
    memcpy(even, &lo, sizeof lo);
    memcpy(odd, &hi, sizeof hi);
}

INLINE void store2_bf16(float *p, VEC even, VEC odd) {
    store(p, ZIP_LO(even, odd));
    store(p + LANES, ZIP_HI(even, odd));
}

INLINE float same(float x) { return x; }

/* Per dtype T (float, bf16 as uint16_t), NAME its load2/store2 and LOAD its scalar load. `c` queries of a head
 * group go together (up to 4), so each key and value is loaded once for all of them: */
#define KERNELS(T, NAME, LOAD)                                                                                      \
    /* scores of a block of keys: scores[i * stride + j] = scale * sum over d of q[i * dim + d] * kt[d * PITCH + j];  \
     * the block at `next` (or none: NULL) is fetched into the cache meanwhile, a row of it per row read */         \
    INLINE void score_##NAME(const float *q, const T *kt, int64_t dim, float scale, float *scores, int64_t stride,  \
                             const int c, const T *next) {                                                          \
        VEC acc[4][4] = {0}, k[4];                                                                                \
        for (int64_t d = 0; d < dim; d++) {                                                                         \
            if (next != NULL) {                                                                                     \
                __builtin_prefetch(next + d * PITCH);                                                               \
                if (PITCH * sizeof(T) > 64) __builtin_prefetch((const char *)(next + d * PITCH) + 64);              \
                if (PITCH * sizeof(T) > 128) __builtin_prefetch((const char *)(next + d * PITCH) + 128);            \
                if (PITCH * sizeof(T) > 192) __builtin_prefetch((const char *)(next + d * PITCH) + 192);            \
            }                                                                                                       \
            load2_##NAME(kt + d * PITCH, &k[0], &k[1]);                                                             \
            load2_##NAME(kt + d * PITCH + 2 * LANES, &k[2], &k[3]);                                                 \
            for (int i = 0; i < c; i++) {                                                                           \
                const VEC qd = (VEC){0} + q[i * dim + d];                                                           \
                for (int m = 0; m < 4; m++) acc[i][m] += qd * k[m];                                                 \
            }                                                                                                       \
        }                                                                                                           \
        for (int i = 0; i < c; i++) {                                                                               \
            store2_##NAME(scores + i * stride, acc[i][0] * scale, acc[i][1] * scale);                               \
            store2_##NAME(scores + i * stride + 2 * LANES, acc[i][2] * scale, acc[i][3] * scale);                   \
        }                                                                                                           \
    }                                                                                                               \
                                                                                                                    \
    /* o[i * dim + d] = sum over j < n of p[i * stride + j] * v[j * dim + d] / totals[i], a head of dim 64 or 128  \
     * (c <= 4 or 2: at most 16 accumulators) */                                                                    \
    INLINE void weigh_##NAME(const float *p, int64_t stride, const T *v, int64_t n, const float *totals, float *o,   \
                             const int dim, const int c) {                                                          \
        VEC acc[4][8] = {0}, x[8];                                                                                \
        for (int64_t j = 0; j < n; j++) {                                                                           \
            for (int m = 0; m < dim / LANES; m += 2) load2_##NAME(v + j * dim + m * LANES, &x[m], &x[m + 1]);       \
            for (int i = 0; i < c; i++) {                                                                           \
                const VEC pj = (VEC){0} + p[i * stride + j];                                                        \
                for (int m = 0; m < dim / LANES; m++) acc[i][m] += pj * x[m];                                       \
            }                                                                                                       \
        }                                                                                                           \
        for (int i = 0; i < c; i++) {                                                                               \
            const float r = 1.0f / totals[i];                                                                       \
            for (int m = 0; m < dim / LANES; m += 2)                                                                \
                store2_##NAME(o + i * dim + m * LANES, acc[i][m] * r, acc[i][m + 1] * r);                           \
        }                                                                                                           \
    }                                                                                                               \
                                                                                                                    \
    /* the same for one query and a head of any dim, in a plain loop */                                           \
    static void weigh_plain_##NAME(const float *p, const T *v, int64_t n, int64_t dim, float total, float *o) {     \
        for (int64_t d0 = 0; d0 < dim; d0 += DIM_MAX) {                                                             \
            const int64_t w = dim - d0 < DIM_MAX ? dim - d0 : DIM_MAX;                                              \
            float acc[DIM_MAX] = {0};                                                                               \
            for (int64_t j = 0; j < n; j++) {                                                                       \
                const T *vj = v + j * dim + d0;                                                                     \
                for (int64_t d = 0; d < w; d++) acc[d] += p[j] * LOAD(vj[d]);                                       \
            }                                                                                                       \
            for (int64_t d = 0; d < w; d++) o[d0 + d] = acc[d] * (1.0f / total);                                    \
        }                                                                                                           \
    }                                                                                                               \
                                                                                                                    \
    /* c queries (1..4) at q, over the n keys and values of one slot and head; scores: c * pitch floats */         \
    INLINE void queries_##NAME(const float *q, const T *kt, const T *v, float *out, float *scores, int64_t n,       \
                               int64_t pitch, int64_t dim, float scale, const int c) {                              \
        for (int64_t j0 = 0; j0 < n; j0 += PITCH) { /* whole blocks: up to PITCH - 1 keys past n, unused */        \
            const T *next = j0 + PITCH < n ? kt + (j0 + PITCH) * dim : NULL;                                        \
            score_##NAME(q, kt + j0 * dim, dim, scale, scores + j0, pitch, c, next);                                \
        }                                                                                                           \
        float totals[4];                                                                                            \
        for (int i = 0; i < c; i++) {                                                                               \
            float *s = scores + i * pitch, top = -INFINITY, total = 0.0f;                                           \
            for (int64_t j = 0; j < n; j++) top = s[j] > top ? s[j] : top;                                          \
            for (int64_t j = 0; j < n; j++) {                                                                       \
                s[j] = expf(s[j] - top);                                                                            \
                total += s[j];                                                                                      \
            }                                                                                                       \
            totals[i] = total;                                                                                      \
        }                                                                                                           \
        if (dim == 64) {                                                                                            \
            weigh_##NAME(scores, pitch, v, n, totals, out, 64, c);                                                  \
        } else if (dim == 128) {                                                                                    \
            for (int i = 0; i < c; i += 2)                                                                          \
                if (c - i >= 2)                                                                                     \
                    weigh_##NAME(scores + i * pitch, pitch, v, n, totals + i, out + i * dim, 128, 2);               \
                else                                                                                                \
                    weigh_##NAME(scores + i * pitch, pitch, v, n, totals + i, out + i * dim, 128, 1);               \
        } else {                                                                                                    \
            for (int i = 0; i < c; i++) weigh_plain_##NAME(scores + i * pitch, v, n, dim, totals[i], out + i * dim); \
        }                                                                                                           \
    }                                                                                                               \
                                                                                                                    \
    /* One item, a (row, kv head), over the buffers' (slot, kv head) number `held`: write its new key and value   \
     * (knew, vnew: dim values each, or NULL) at n - 1, then its `group` queries q (group * dim floats) over its n  \
     * keys, four at a time, into out (group * dim floats). kt_all, v_all: the whole buffers; scores: 4 * pitch     \
     * floats of scratch. */                                                                                        \
    static void one_##NAME(const float *q, const T *knew, const T *vnew, void *kt_all, void *v_all, float *out,     \
                           float *scores, int64_t held, int64_t n, int64_t group, int64_t width, int64_t pitch,     \
                           int64_t dim, float scale) {                                                              \
        T *kt = (T *)kt_all + held * pitch * dim, *v = (T *)v_all + held * width * dim;                             \
        if (knew != NULL) {                                                                                         \
            for (int64_t d = 0; d < dim; d++) {                                                                     \
                kt[((n - 1) / PITCH * dim + d) * PITCH + (n - 1) % PITCH] = knew[d];                                \
                v[(n - 1) * dim + d] = vnew[d];                                                                     \
            }                                                                                                       \
        }                                                                                                           \
        for (int64_t g = 0; g < group; g += 4) {                                                                    \
            const float *qg = q + g * dim;                                                                          \
            float *og = out + g * dim;                                                                              \
            switch (group - g < 4 ? group - g : 4) {                                                                \
            case 1: queries_##NAME(qg, kt, v, og, scores, n, pitch, dim, scale, 1); break;                          \
            case 2: queries_##NAME(qg, kt, v, og, scores, n, pitch, dim, scale, 2); break;                          \
            case 3: queries_##NAME(qg, kt, v, og, scores, n, pitch, dim, scale, 3); break;                          \
            default: queries_##NAME(qg, kt, v, og, scores, n, pitch, dim, scale, 4);                                \
            }                                                                                                       \
        }                                                                                                           \
    }

KERNELS(float, float, same)
KERNELS(uint16_t, bf16, widen)

/* The first 1 KB of the keys and values of slot and head `held` + 1, the next item of a decode step, fetched into
 * the cache while this one is computed: a run of memory the hardware prefetcher has not met yet. */
static inline void fetch_next(const void *kt, const void *v, int64_t held, int64_t pitch, int64_t width, int64_t dim,
                              int64_t size) {
    const char *k = (const char *)kt + (held + 1) * pitch * dim * size;
    const char *x = (const char *)v + (held + 1) * width * dim * size;
    for (int i = 0; i < 16; i++) {
        __builtin_prefetch(k + 64 * i);
        __builtin_prefetch(x + 64 * i);
    }
}

/* The rows [*from, *to) thread t of `threads` computes: consecutive rows of about equal work (a row's keys and
 * values read, plus a block's worth for its fixed costs), so that no thread waits on a longer share at the end. Which
 * thread computes a row does not change its numbers. */
static void share(const int64_t *lengths, int64_t rows, int t, int threads, int64_t *from, int64_t *to) {
    int64_t total = 0;
    for (int64_t b = 0; b < rows; b++) total += (lengths[b] > 0 ? lengths[b] : 0) + PITCH;
    int64_t done = 0, b = 0;
    for (; b < rows && done * threads < total * t; b++) done += (lengths[b] > 0 ? lengths[b] : 0) + PITCH;
    *from = b;
    for (; b < rows && done * threads < total * (t + 1); b++) done += (lengths[b] > 0 ? lengths[b] : 0) + PITCH;
    *to = t == threads - 1 ? rows : b;
}

/* Returns 0, or 1 where a row had no keys (or more than width), the pitch is not whole blocks, or a thread had no
 * memory for its scores.
 * bf16: 1 for bf16 buffers. */
int orca2_decode_attention(const float *q, const void *knew, const void *vnew, void *kt, void *v,
                           const int64_t *lengths, const int64_t *slots, float *out, int64_t rows, int64_t kv_heads,
                           int64_t group, int64_t width, int64_t pitch, int64_t dim, float scale, int bf16,
                           int threads) {
    if (pitch % PITCH != 0 || pitch < width) return 1; /* blocks would be read past the rows */
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * 4 * pitch);
        int64_t from, to;
        share(lengths, rows, omp_get_thread_num(), omp_get_num_threads(), &from, &to);
        for (int64_t item = from * kv_heads; item < to * kv_heads; item++) { /* item = row * kv_heads + kv head */
            const int64_t b = item / kv_heads, n = lengths[b];
            const int64_t held = (slots == NULL ? b : slots[b]) * kv_heads + item % kv_heads;
            if (slots == NULL && item + 1 < rows * kv_heads) /* a decode step: the next item is the next slot */
                fetch_next(kt, v, held, pitch, width, dim, bf16 ? 2 : 4);
            if (scores == NULL || n < 1 || n > width)
                failed = 1;
            else if (bf16)
                one_bf16(q + item * group * dim, knew == NULL ? NULL : (const uint16_t *)knew + item * dim,
                         vnew == NULL ? NULL : (const uint16_t *)vnew + item * dim, kt, v, out + item * group * dim,
                         scores, held, n, group, width, pitch, dim, scale);
            else
                one_float(q + item * group * dim, knew == NULL ? NULL : (const float *)knew + item * dim,
                          vnew == NULL ? NULL : (const float *)vnew + item * dim, kt, v, out + item * group * dim,
                          scores, held, n, group, width, pitch, dim, scale);
        }
        free(scores);
    }
    return failed;
}

/* The decode step's attention read straight from its joined q/k/v product and written in the model's dtype, so no
 * tensor is copied or converted around the call: what orca2_decode_attention computes, then the output rounded as
 * torch's .to(bf16) rounds it (to nearest even), the same numbers bit for bit.
 *   joined  the buffers' dtype, row b at joined + b * stride: queries (kv_heads * group heads of dim) first, this
 *           step's keys at k_off, values at v_off (the rotary embedding already applied)
 *   slots   NULL: row b writes its new key and value into slot b, then attends over it (a decode step); else row b
 *           attends over slots[b], where its keys were written before (a prefill: every token of a packed row,
 *           each over its causal span of its prompt's slot), and the row's keys and values are not read
 *   out     the buffers' dtype (rows, kv_heads * group, dim)
 * Returns what orca2_decode_attention returns. */
int orca2_decode_attention_joined(const void *joined, int64_t stride, int64_t k_off, int64_t v_off, void *kt, void *v,
                                  const int64_t *lengths, const int64_t *slots, void *out, int64_t rows,
                                  int64_t kv_heads, int64_t group, int64_t width, int64_t pitch, int64_t dim,
                                  float scale, int bf16, int threads) {
    if (pitch % PITCH != 0 || pitch < width) return 1;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (4 * pitch + 2 * group * dim)); /* + a group's queries and outputs */
        int64_t from, to;
        share(lengths, rows, omp_get_thread_num(), omp_get_num_threads(), &from, &to);
        for (int64_t item = from * kv_heads; item < to * kv_heads; item++) {
            const int64_t b = item / kv_heads, h = item % kv_heads, n = lengths[b];
            const int64_t held = (slots == NULL ? b : slots[b]) * kv_heads + h;
            if (slots == NULL && item + 1 < rows * kv_heads) /* a decode step: the next item is the next slot */
                fetch_next(kt, v, held, pitch, width, dim, bf16 ? 2 : 4);
            if (scores == NULL || n < 1 || n > width) {
                failed = 1;
                continue;
            }
            float *q = scores + 4 * pitch, *o = q + group * dim;
            const int64_t row = b * stride, qs = row + h * group * dim, ks = row + k_off + h * dim;
            const int64_t os = (b * kv_heads + h) * group * dim;
            if (bf16) {
                const uint16_t *x = (const uint16_t *)joined;
                for (int64_t i = 0; i < group * dim; i++) q[i] = widen(x[qs + i]);
                const uint16_t *knew = slots == NULL ? x + ks : NULL, *vnew = x + row + v_off + h * dim;
                one_bf16(q, knew, vnew, kt, v, o, scores, held, n, group, width, pitch, dim, scale);
                for (int64_t i = 0; i < group * dim; i++) ((uint16_t *)out)[os + i] = narrow(o[i]);
            } else {
                const float *x = (const float *)joined;
                const float *knew = slots == NULL ? x + ks : NULL, *vnew = x + row + v_off + h * dim;
                one_float(x + qs, knew, vnew, kt, v, (float *)out + os, scores, held, n, group, width, pitch, dim, scale);
            }
        }
        free(scores);
    }
    return failed;
}
