/* bf16 as the native kernels hold it: the top half of a float, passed as uint16_t (orca2/csrc/decode_attention.c,
 * orca2/csrc/decode_ops.c). Widening is exact; narrowing rounds to nearest even, as c10::BFloat16 does, and keeps a
 * NaN a quiet NaN. */
#ifndef ORCA2_BF16_H
#define ORCA2_BF16_H

#include <stdint.h>
#include <string.h>

static inline float widen(uint16_t x) {
    const uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t narrow(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static inline float round_bf16(float f) { return widen(narrow(f)); }

#endif
