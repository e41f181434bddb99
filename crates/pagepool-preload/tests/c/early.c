/* A library the test program is linked with: its constructor runs before the drop-in's (the
 * dynamic loader initialises a program's libraries before the preloaded ones), so what it
 * allocates comes from glibc while the drop-in is not ready yet. */
#include <stdlib.h>
#include <string.h>

void *early_big;   /* 1 MiB, every byte 0x3c */
void *early_small; /* 100 bytes, every byte 0x3d */
void *early_zeroed; /* 2 MiB from calloc */

__attribute__((constructor)) static void early_init(void) {
    early_big = malloc(1 << 20);
    early_small = malloc(100);
    early_zeroed = calloc(2 << 20, 1);
    if (early_big) memset(early_big, 0x3c, 1 << 20);
    if (early_small) memset(early_small, 0x3d, 100);
}
