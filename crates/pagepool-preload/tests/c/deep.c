/* A library the test opens with RTLD_DEEPBIND: bound deeply, its calls of malloc and free
 * would reach glibc's own, which must never see a pointer of the pools. */
#include <stdlib.h>

void deep_free(void *p) { free(p); }
void *deep_malloc(size_t n) { return malloc(n); }
void *deep_realloc(void *p, size_t n) { return realloc(p, n); }
