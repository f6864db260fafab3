/* Compiler/platform glue for lwIP on Linux (gcc or clang, any byte order). */
#ifndef TUNLWIP_ARCH_CC_H
#define TUNLWIP_ARCH_CC_H

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>

/* lwIP silently assumes little endian unless told; ask the compiler. */
#ifndef BYTE_ORDER
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define BYTE_ORDER BIG_ENDIAN
#else
#define BYTE_ORDER LITTLE_ENDIAN
#endif
#endif

uint32_t tl_random32(void);
#define LWIP_RAND() ((u32_t)tl_random32())

#define LWIP_PLATFORM_DIAG(x) do { printf x; } while (0)
/* An lwIP assertion means a misuse that would otherwise corrupt memory: report and stop. */
#define LWIP_PLATFORM_ASSERT(x) do { \
    fprintf(stderr, "tunlwip: lwIP assertion \"%s\" failed at %s:%d\n", (x), __FILE__, __LINE__); \
    fflush(NULL); abort(); } while (0)

#endif /* TUNLWIP_ARCH_CC_H */
