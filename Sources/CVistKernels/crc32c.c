// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of vist2's cache files.
// The SSE4.2 crc32 instruction when the CPU has it (~8 bytes per 3 cycles), a byte table
// otherwise; both give the same value (tested against the standard check value "123456789").
#include "CVistKernels.h"
#include <pthread.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define VK_X86_CRC 1
#include <nmmintrin.h>
#endif

static uint32_t crc_table[256];
static int crc_hw = 0;
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[i] = c;
    }
#ifdef VK_X86_CRC
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2");
#endif
}

static uint32_t crc_sw(uint32_t c, const uint8_t *p, size_t n) {
    while (n--) c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
    return c;
}

#ifdef VK_X86_CRC
__attribute__((target("sse4.2"))) static uint32_t crc_sse42(uint32_t c, const uint8_t *p, size_t n) {
    uint64_t c64 = c;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = _mm_crc32_u64(c64, w);
        p += 8;
        n -= 8;
    }
    c = (uint32_t)c64;
    while (n--) c = _mm_crc32_u8(c, *p++);
    return c;
}
#endif

uint32_t vk_crc32c(uint32_t crc, const void *data, size_t n) {
    pthread_once(&crc_once, crc_init);
    uint32_t c = ~crc;
    const uint8_t *p = (const uint8_t *)data;
#ifdef VK_X86_CRC
    if (crc_hw) return ~crc_sse42(c, p, n);
#endif
    return ~crc_sw(c, p, n);
}

uint32_t vk_crc32c_portable(uint32_t crc, const void *data, size_t n) {
    pthread_once(&crc_once, crc_init);
    return ~crc_sw(~crc, (const uint8_t *)data, n);
}
