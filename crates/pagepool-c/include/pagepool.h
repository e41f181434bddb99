/*
 * pagepool: large zeroed buffers from pools of private memory kept clean by a background
 * worker (libpagepool.so / libpagepool.a; built by `cargo build --release -p pagepool-c`).
 *
 * Requests of 64 KiB and more (up to 64 MiB) come from pagepool's pools; every other
 * request, and every pointer the pools did not make, goes to the C library's malloc. The
 * functions behave as glibc's do at the edges: pagepool_free(NULL) does nothing and keeps
 * errno; pagepool_malloc(0) returns a unique pointer; pagepool_realloc(p, 0) frees p and
 * returns NULL; pagepool_calloc overflow returns NULL with errno ENOMEM; alignments are powers
 * of two (others: NULL, errno EINVAL). A pointer inside the pools that starts no live block
 * (a double free, a pointer into a block) ends the process with one line on stderr.
 *
 * Compiles as C99 and as C++.
 */
#ifndef PAGEPOOL_H
#define PAGEPOOL_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* malloc: contents unspecified. */
void *pagepool_malloc(size_t size);
/* calloc: n * size zeroed bytes; NULL and ENOMEM when n * size overflows. */
void *pagepool_calloc(size_t n, size_t size);
/* realloc: contents kept up to the smaller size; grows in place where the block allows. */
void *pagepool_realloc(void *p, size_t size);
/* free: any pointer from these functions, or NULL. */
void pagepool_free(void *p);
/* aligned_alloc: align a power of two (8 bytes to 2 MiB and beyond). */
void *pagepool_aligned_alloc(size_t align, size_t size);
/* malloc_usable_size: the bytes usable at p (0 for NULL). */
size_t pagepool_usable_size(void *p);
/* Gives every pooled block's memory back to the system; returns the bytes given back. */
size_t pagepool_trim(void);
/* Writes the pools' statistics as text to file descriptor fd; 0 on success, -1 on error
 * (errno set). */
int pagepool_write_stats(int fd);

#ifdef __cplusplus
}
#endif

#endif /* PAGEPOOL_H */
