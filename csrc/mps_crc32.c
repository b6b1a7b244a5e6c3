/* mps_crc32: see mps_crc32.h. */
#include "mps_crc32.h"

#include <string.h>

static uint32_t tables[8][256]; /* tables[k][b]: b's byte shifted through k more zero bytes */

__attribute__((constructor)) static void tables_init(void)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int bit = 0; bit < 8; bit++)
            c = c & 1 ? (c >> 1) ^ 0xEDB88320u : c >> 1;
        tables[0][b] = c;
    }
    for (int k = 1; k < 8; k++)
        for (uint32_t b = 0; b < 256; b++)
            tables[k][b] = (tables[k - 1][b] >> 8) ^ tables[0][tables[k - 1][b] & 0xff];
}

/* reg: the running register (the CRC inverted), as the fold keeps it too */
static uint32_t by_tables(uint8_t *dst, const uint8_t *src, uint64_t n, uint32_t reg)
{
    for (; n >= 8; n -= 8, src += 8) {
        uint64_t w; /* each byte read once: the file gets the bytes the checksum saw */
        memcpy(&w, src, 8);
        if (dst) {
            memcpy(dst, &w, 8);
            dst += 8;
        }
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        w = __builtin_bswap64(w); /* the tables take the first byte in the low bits */
#endif
        w ^= reg;
        reg = tables[7][w & 0xff] ^ tables[6][(w >> 8) & 0xff] ^ tables[5][(w >> 16) & 0xff] ^
              tables[4][(w >> 24) & 0xff] ^ tables[3][(w >> 32) & 0xff] ^ tables[2][(w >> 40) & 0xff] ^
              tables[1][(w >> 48) & 0xff] ^ tables[0][w >> 56];
    }
    for (; n; n--, src++) {
        uint8_t b = *src;
        if (dst)
            *dst++ = b;
        reg = tables[0][(reg ^ b) & 0xff] ^ (reg >> 8);
    }
    return reg;
}

uint32_t mps_copy_crc32_tables(uint8_t *dst, const uint8_t *src, uint64_t n, uint32_t crc)
{
    return ~by_tables(dst, src, n, ~crc);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* The constants are x^(k) mod P for the fold distances, bit-reflected (the paper's table for
 * the reflected CRC-32): 512 bits (k1, k2), 128 bits (k3, k4), 64 bits (k5), and Barrett's
 * P' and mu for the last reduction to 32 bits. */
#define FOLD_512 _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL)
#define FOLD_128 _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL)
#define FOLD_64 _mm_set_epi64x(0, 0x0163cd6124LL)
#define BARRETT _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL)

__attribute__((target("pclmul,sse4.1"))) static inline __m128i fold(__m128i x, __m128i k, __m128i next)
{
    return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), next);
}

__attribute__((target("pclmul,sse4.1"))) static inline __m128i load_copy(uint8_t *dst, const uint8_t *src)
{
    __m128i x = _mm_loadu_si128((const __m128i *)src);
    if (dst)
        _mm_storeu_si128((__m128i *)dst, x);
    return x;
}

/* reg after src[0..n), n >= 64 and a multiple of 16 */
__attribute__((target("pclmul,sse4.1"))) static uint32_t by_folding(uint8_t *dst, const uint8_t *src, uint64_t n,
                                                                    uint32_t reg)
{
    __m128i x[4];
    for (int i = 0; i < 4; i++)
        x[i] = load_copy(dst ? dst + 16 * i : NULL, src + 16 * i);
    x[0] = _mm_xor_si128(x[0], _mm_cvtsi32_si128((int)reg));
    for (src += 64, dst = dst ? dst + 64 : NULL, n -= 64; n >= 64; src += 64, dst = dst ? dst + 64 : NULL, n -= 64)
        for (int i = 0; i < 4; i++)
            x[i] = fold(x[i], FOLD_512, load_copy(dst ? dst + 16 * i : NULL, src + 16 * i));
    __m128i acc = fold(fold(fold(x[0], FOLD_128, x[1]), FOLD_128, x[2]), FOLD_128, x[3]);
    for (; n >= 16; src += 16, dst = dst ? dst + 16 : NULL, n -= 16)
        acc = fold(acc, FOLD_128, load_copy(dst, src));
    /* 128 bits to 64, to 32 (times x^32), then Barrett's reduction */
    const __m128i low32 = _mm_setr_epi32(~0, 0, ~0, 0);
    acc = _mm_xor_si128(_mm_srli_si128(acc, 8), _mm_clmulepi64_si128(acc, FOLD_128, 0x10));
    acc = _mm_xor_si128(_mm_srli_si128(acc, 4), _mm_clmulepi64_si128(_mm_and_si128(acc, low32), FOLD_64, 0x00));
    __m128i t = _mm_clmulepi64_si128(_mm_and_si128(acc, low32), BARRETT, 0x10);
    t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), BARRETT, 0x00);
    return (uint32_t)_mm_extract_epi32(_mm_xor_si128(acc, t), 1);
}

static int can_fold;

__attribute__((constructor)) static void can_fold_init(void)
{
    __builtin_cpu_init();
    can_fold = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
}

uint32_t mps_copy_crc32(uint8_t *dst, const uint8_t *src, uint64_t n, uint32_t crc)
{
    uint32_t reg = ~crc;
    if (can_fold && n >= 64) {
        uint64_t whole = n & ~(uint64_t)15;
        reg = by_folding(dst, src, whole, reg);
        src += whole;
        dst = dst ? dst + whole : NULL;
        n -= whole;
    }
    return ~by_tables(dst, src, n, reg);
}

int mps_crc32_folds(void)
{
    return can_fold;
}
#else
uint32_t mps_copy_crc32(uint8_t *dst, const uint8_t *src, uint64_t n, uint32_t crc)
{
    return mps_copy_crc32_tables(dst, src, n, crc);
}

int mps_crc32_folds(void)
{
    return 0;
}
#endif
