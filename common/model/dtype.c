/* dtype.c: element types and the exact conversions between fp32 and the two 16-bit float formats.
 *
 * bf16 is the top half of an fp32, so widening is a shift and narrowing is a round-to-nearest-even
 * on the dropped 16 bits. fp16 has its own exponent range, so both directions handle subnormals,
 * overflow to infinity and NaN payloads explicitly. Narrowing uses integer arithmetic except for
 * the fp16-subnormal case, where one fp32 addition lets the FPU do the rounding (the trick from
 * Fabian Giesen's half conversions); this assumes the default round-to-nearest mode, which the
 * project never changes. Everything here is pure and thread-safe.
 */
#include "model/model.h"

#include <string.h>

size_t pds_dtype_size(pds_dtype_t t)
{
    switch (t) {
    case PDS_DTYPE_F32:
        return 4;
    case PDS_DTYPE_F16:
    case PDS_DTYPE_BF16:
        return 2;
    }
    return 0;
}

const char *pds_dtype_name(pds_dtype_t t)
{
    switch (t) {
    case PDS_DTYPE_F32:
        return "F32";
    case PDS_DTYPE_F16:
        return "F16";
    case PDS_DTYPE_BF16:
        return "BF16";
    }
    return "?";
}

static inline uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float pds_bf16_to_f32(uint16_t h)
{
    return bits_f32((uint32_t)h << 16);
}

uint16_t pds_f32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    /* NaN: keep sign and the top payload bits, and force the quiet bit so that a payload living
     * only in the low 16 bits does not turn into infinity. */
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
    /* Round to nearest, ties to even: add 0x7fff plus the lowest kept bit. A carry out of the
     * mantissa bumps the exponent, which is right (and gives inf past the largest finite). */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float pds_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0) {
        /* zero or subnormal: mant * 2^-24, exact in fp32 */
        float v = (float)mant * 0x1p-24f;
        return bits_f32(f32_bits(v) | sign);
    }
    if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13)); /* inf, NaN payload kept */
    return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

uint16_t pds_f32_to_f16(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) /* NaN: quiet, top payload bits kept */
        return (uint16_t)(sign | 0x7e00u | ((u >> 13) & 0x3ffu));
    if (u >= 0x477ff000u) /* >= 65520 rounds to inf (65504 is the largest finite, odd mantissa) */
        return (uint16_t)(sign | 0x7c00u);
    if (u < 0x38800000u) {
        /* below 2^-14: fp16 subnormal or zero. Adding 0.5f aligns the value so that its fp16
         * mantissa lands in the low bits, and the FPU rounds the addition to nearest even. */
        float v = bits_f32(u) + 0.5f;
        return (uint16_t)(sign | (uint16_t)(f32_bits(v) - 0x3f000000u));
    }
    /* normal: rebias the exponent, round to nearest even on the 13 dropped bits */
    uint32_t odd = (u >> 13) & 1u;
    u += ((uint32_t)(15 - 127) << 23) + 0xfffu + odd;
    return (uint16_t)(sign | (uint16_t)(u >> 13));
}

void pds_tensor_to_f32(const pds_tensor_view_t *t, int64_t offset, int64_t n, float *dst)
{
    PDS_ASSERT(t && offset >= 0 && n >= 0 && offset + n <= t->numel);
    const unsigned char *src =
        (const unsigned char *)t->data + (size_t)offset * pds_dtype_size(t->dtype);
    switch (t->dtype) {
    case PDS_DTYPE_F32:
        memcpy(dst, src, (size_t)n * 4);
        break;
    case PDS_DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2); /* views may be unaligned in principle: no typed loads */
            dst[i] = pds_bf16_to_f32(h);
        }
        break;
    case PDS_DTYPE_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, src + 2 * i, 2);
            dst[i] = pds_f16_to_f32(h);
        }
        break;
    }
}
