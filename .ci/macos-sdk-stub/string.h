/* Stand-in for the macOS SDK's header for type-checking ring on Linux (see
 * TargetConditionals.h): the declarations ring's C code uses. */
#pragma once
#include <stddef.h>
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
