/*
 * mps_crc32: the CRC-32 of zlib (and gzip, PNG: the reflected polynomial 0xEDB88320), taken
 * while copying, for checkpoint files. Where the CPU multiplies carry-less (x86-64 PCLMULQDQ)
 * 64 bytes are folded a step (Gopal et al., "Fast CRC Computation for Generic Polynomials
 * Using PCLMULQDQ Instruction", Intel 2009); elsewhere, and for the last bytes, 8 bytes a
 * step by table lookups (slicing-by-8). The result equals zlib.crc32(src, crc).
 */
#ifndef MPS_CRC32_H
#define MPS_CRC32_H

#include <stdint.h>

/* The CRC-32 of src[0..n) continuing crc (0 to start), copying src to dst when dst is not
 * NULL (dst and src must not overlap). */
uint32_t mps_copy_crc32(uint8_t *dst, const uint8_t *src, uint64_t n, uint32_t crc);

/* The same by table lookups only, on every CPU: what mps_copy_crc32 uses without the
 * carry-less multiply (tests compare both with zlib). */
uint32_t mps_copy_crc32_tables(uint8_t *dst, const uint8_t *src, uint64_t n, uint32_t crc);

/* 1 when mps_copy_crc32 folds with the carry-less multiply on this CPU, else 0. */
int mps_crc32_folds(void);

#endif
