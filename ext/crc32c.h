/*
 * CRC-32C (Castagnoli): reflected polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF.
 *
 * Two implementations with one interface, uint32_t f(uint32_t crc, const uint8_t *p, size_t n),
 * where crc is a finished CRC (0 to start) and the result is the finished CRC of the data that
 * crc covered followed by p[0..n). Finished values chain: f(f(0, a), b) == f(0, a || b).
 *
 *  - mq_crc32c_sw: portable slicing-by-8 (eight 256-entry tables, one 64-bit word per step);
 *  - mq_crc32c_sse42: the SSE4.2 CRC32 instruction, x86-64 with GCC or Clang only. It is compiled
 *    with a per-function target attribute, so the rest of the module needs no -msse4.2 and the
 *    binary still runs on a CPU without it. Define MQ_CRC32C_NO_SSE42 to build without it (as on
 *    other architectures, which get only the software path).
 *
 * mq_crc32c_init() must run once (the module init does it) before anything here is used: it
 * fills the tables and picks the implementation mq_crc32c() dispatches to.
 */
#ifndef MQSTORE_CRC32C_H
#define MQSTORE_CRC32C_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MQ_CRC32C_POLY 0x82F63B78u

/* mq_crc32c_table[k][b]: the CRC register after feeding byte b and then k zero bytes into a zero
 * register. Slicing-by-8 looks up all eight bytes of a word at once, each in the table for its
 * distance from the end of the word, and XORs the results. */
static uint32_t mq_crc32c_table[8][256];

static void mq_crc32c_init_tables(void)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int bit = 0; bit < 8; bit++)
            c = (c >> 1) ^ (MQ_CRC32C_POLY & (0u - (c & 1u)));
        mq_crc32c_table[0][b] = c;
    }
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = mq_crc32c_table[0][b];
        for (int k = 1; k < 8; k++) {
            c = (c >> 8) ^ mq_crc32c_table[0][c & 0xFFu];
            mq_crc32c_table[k][b] = c;
        }
    }
}

static inline uint32_t mq_crc32c_sw_byte(uint32_t reg, uint8_t byte)
{
    return (reg >> 8) ^ mq_crc32c_table[0][(reg ^ byte) & 0xFFu];
}

static uint32_t mq_crc32c_sw(uint32_t crc, const uint8_t *p, size_t n)
{
    uint32_t reg = ~crc;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    /* Word steps load 8 bytes in memory order into a little-endian integer, so the first byte
     * lands in the low bits, where the reflected CRC register consumes first. A big-endian host
     * would need byte swaps; it takes the byte loop below instead (slower, still correct). */
    while (n > 0 && ((uintptr_t)p & 7u) != 0) { /* align so the word loads are aligned */
        reg = mq_crc32c_sw_byte(reg, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8); /* compiles to one load; memcpy avoids aliasing/alignment UB */
        w ^= reg;
        reg = mq_crc32c_table[7][w & 0xFFu] ^ mq_crc32c_table[6][(w >> 8) & 0xFFu] ^
              mq_crc32c_table[5][(w >> 16) & 0xFFu] ^ mq_crc32c_table[4][(w >> 24) & 0xFFu] ^
              mq_crc32c_table[3][(w >> 32) & 0xFFu] ^ mq_crc32c_table[2][(w >> 40) & 0xFFu] ^
              mq_crc32c_table[1][(w >> 48) & 0xFFu] ^ mq_crc32c_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
#endif
    while (n > 0) {
        reg = mq_crc32c_sw_byte(reg, *p++);
        n--;
    }
    return ~reg;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(MQ_CRC32C_NO_SSE42)
#define MQ_CRC32C_HAVE_SSE42 1
#include <nmmintrin.h>

__attribute__((target("sse4.2"))) static uint32_t mq_crc32c_sse42(uint32_t crc, const uint8_t *p, size_t n)
{
    /* The CRC32 instruction implements exactly this CRC's register update (reflected
     * 0x82F63B78) without the pre/post inversion, which is done here as in the software path. */
    uint32_t reg = ~crc;
    while (n > 0 && ((uintptr_t)p & 7u) != 0) {
        reg = _mm_crc32_u8(reg, *p++);
        n--;
    }
    uint64_t reg64 = reg;
    /* Four words per iteration only trims loop overhead; each instruction depends on the previous
     * one, so throughput is bounded by its latency (3 cycles per 8 bytes). */
    while (n >= 32) {
        uint64_t w0, w1, w2, w3;
        memcpy(&w0, p, 8);
        memcpy(&w1, p + 8, 8);
        memcpy(&w2, p + 16, 8);
        memcpy(&w3, p + 24, 8);
        reg64 = _mm_crc32_u64(reg64, w0);
        reg64 = _mm_crc32_u64(reg64, w1);
        reg64 = _mm_crc32_u64(reg64, w2);
        reg64 = _mm_crc32_u64(reg64, w3);
        p += 32;
        n -= 32;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        reg64 = _mm_crc32_u64(reg64, w);
        p += 8;
        n -= 8;
    }
    reg = (uint32_t)reg64;
    while (n > 0) {
        reg = _mm_crc32_u8(reg, *p++);
        n--;
    }
    return ~reg;
}
#endif

typedef uint32_t (*mq_crc32c_fn)(uint32_t crc, const uint8_t *p, size_t n);

static mq_crc32c_fn mq_crc32c_impl = mq_crc32c_sw;
static const char *mq_crc32c_impl_name = "slicing-by-8";

static void mq_crc32c_init(void)
{
    mq_crc32c_init_tables();
#ifdef MQ_CRC32C_HAVE_SSE42
    __builtin_cpu_init(); /* required before __builtin_cpu_supports outside a constructor */
    if (__builtin_cpu_supports("sse4.2")) {
        mq_crc32c_impl = mq_crc32c_sse42;
        mq_crc32c_impl_name = "sse4.2";
    }
#endif
}

static inline uint32_t mq_crc32c(uint32_t crc, const uint8_t *p, size_t n)
{
    return mq_crc32c_impl(crc, p, n);
}

#endif /* MQSTORE_CRC32C_H */
