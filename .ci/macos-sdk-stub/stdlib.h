/* Stand-in for the macOS SDK's header for type-checking ring on Linux (see
 * TargetConditionals.h): the declarations ring's C code uses. */
#pragma once
#include <stddef.h>
void abort(void);
void *malloc(size_t n);
void free(void *p);
