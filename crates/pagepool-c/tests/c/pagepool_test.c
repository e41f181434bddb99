/* The C library from C: glibc's edge cases, zeroed memory after dirty frees, realloc, threads
 * freeing each other's buffers, fork (copy-on-write, a child allocating on its own).
 * `pagepool_test double` and `pagepool_test inside` make a bad free, which must abort. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <pagepool.h>

#define CHECK(c)                                                                   \
    do {                                                                           \
        if (!(c)) {                                                                \
            fprintf(stderr, "%s:%d: failed: %s\n", __FILE__, __LINE__, #c);        \
            exit(1);                                                               \
        }                                                                          \
    } while (0)

/* Every byte of p[0..n) is v (every 512th and the last: enough to see a page left dirty). */
static int all(const unsigned char *p, size_t n, unsigned char v) {
    size_t i;
    for (i = 0; i < n; i += 512)
        if (p[i] != v) return 0;
    return p[n - 1] == v;
}

static void edges(void) {
    void *p, *z, *big;
    size_t a, s, i;
    static const size_t sizes[] = {100, 100 << 10, 3 << 20};

    errno = 1234;
    pagepool_free(NULL);
    CHECK(errno == 1234);

    z = pagepool_malloc(0);
    CHECK(z != NULL);
    pagepool_free(z);

    errno = 0;
    CHECK(pagepool_calloc(SIZE_MAX / 2, 3) == NULL);
    CHECK(errno == ENOMEM);

    p = pagepool_malloc(1 << 20);
    CHECK(p != NULL && (uintptr_t)p % 16 == 0);
    CHECK(pagepool_realloc(p, 0) == NULL); /* frees p, as glibc does */

    errno = 0;
    CHECK(pagepool_aligned_alloc(3, 100) == NULL);
    CHECK(errno == EINVAL);
    for (a = 8; a <= ((size_t)2 << 20); a <<= 1) {
        for (i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            s = sizes[i];
            p = pagepool_aligned_alloc(a, s);
            CHECK(p != NULL && (uintptr_t)p % a == 0);
            memset(p, 1, s);
            pagepool_free(p);
        }
    }

    CHECK(pagepool_usable_size(NULL) == 0);
    big = pagepool_malloc(100 << 10);
    CHECK(big != NULL && pagepool_usable_size(big) >= (100 << 10));
    memset(big, 2, pagepool_usable_size(big)); /* usable: all of it may be written */
    errno = 77;
    pagepool_free(big);
    CHECK(errno == 77);

    for (i = 0; i < 20; i++) {
        unsigned char *c = pagepool_calloc(1, 8 << 20);
        CHECK(c != NULL && all(c, 8 << 20, 0));
        memset(c, 0xab, 8 << 20);
        pagepool_free(c);
    }
    {
        unsigned char *c = pagepool_calloc(128, 1 << 10); /* the 128 KiB block written in full above */
        CHECK(c != NULL && all(c, 128 << 10, 0));
        pagepool_free(c);
    }
}

static void grow(void) {
    size_t n, i;
    unsigned *v = NULL;
    for (n = 256; n <= ((size_t)16 << 20); n *= 2) { /* 1 KiB to 64 MiB of unsigned */
        unsigned *w = pagepool_realloc(v, n * sizeof *w);
        CHECK(w != NULL);
        for (i = n / 2; i < n; i++) w[i] = (unsigned)i;
        if (n == 256)
            for (i = 0; i < n / 2; i++) w[i] = (unsigned)i;
        v = w;
    }
    for (i = 0; i < ((size_t)16 << 20); i += 4099) CHECK(v[i] == (unsigned)i);
    v = pagepool_realloc(v, 1000 * sizeof *v); /* shrinks: kept */
    for (i = 0; i < 1000; i++) CHECK(v[i] == (unsigned)i);
    pagepool_free(v);
}

#define THREADS 8
#define ROUNDS 200
static pthread_mutex_t handoff_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned char *handoff[THREADS * ROUNDS];
static size_t handoff_len[THREADS * ROUNDS];
static size_t handoff_n;

static void *worker(void *arg) {
    uint64_t x = (uint64_t)(uintptr_t)arg * 0x9e3779b97f4a7c15ull + 1;
    unsigned char mark = (unsigned char)(0x80 | (uintptr_t)arg);
    int i;
    for (i = 0; i < ROUNDS; i++) {
        size_t size;
        unsigned char *b;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        size = (64 << 10) + (size_t)(x % (12 << 20));
        if (i % 2 == 0) {
            b = pagepool_calloc(1, size);
            CHECK(b != NULL && all(b, size, 0));
        } else {
            b = pagepool_malloc(size);
            CHECK(b != NULL);
        }
        memset(b, mark, size);
        pthread_mutex_lock(&handoff_lock);
        if (i % 3 == 0) { /* another thread frees it */
            handoff[handoff_n] = b;
            handoff_len[handoff_n++] = size;
            b = NULL;
        } else if (handoff_n > 0 && i % 5 == 0) {
            unsigned char *o = handoff[--handoff_n];
            size_t len = handoff_len[handoff_n];
            pthread_mutex_unlock(&handoff_lock);
            CHECK((o[0] & 0x80) && all(o, len, o[0]));
            pagepool_free(o);
            pthread_mutex_lock(&handoff_lock);
        }
        pthread_mutex_unlock(&handoff_lock);
        pagepool_free(b);
    }
    return NULL;
}

static void threads(void) {
    pthread_t t[THREADS];
    uintptr_t i;
    for (i = 0; i < THREADS; i++) CHECK(pthread_create(&t[i], NULL, worker, (void *)i) == 0);
    for (i = 0; i < THREADS; i++) CHECK(pthread_join(t[i], NULL) == 0);
    while (handoff_n > 0) pagepool_free(handoff[--handoff_n]);
}

static void forked(void) {
    unsigned char *parent = pagepool_malloc(8 << 20);
    pid_t pid;
    int status = 0;
    CHECK(parent != NULL);
    memset(parent, 7, 8 << 20);
    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        int i;
        if (!all(parent, 8 << 20, 7)) _exit(2);
        memset(parent, 9, 8 << 20); /* its own copy */
        pagepool_free(parent);
        for (i = 0; i < 20; i++) {
            unsigned char *c = pagepool_calloc(1, 8 << 20);
            if (c == NULL || !all(c, 8 << 20, 0)) _exit(3);
            memset(c, 5, 8 << 20);
            pagepool_free(c);
        }
        _exit(0);
    }
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK(all(parent, 8 << 20, 7));
    pagepool_free(parent);
}

int main(int argc, char **argv) {
    if (argc > 1) { /* a bad free: must not return */
        unsigned char *p = pagepool_malloc(1 << 20);
        if (strcmp(argv[1], "double") == 0) {
            pagepool_free(p);
            pagepool_free(p);
        } else {
            pagepool_free(p + 4096);
        }
        printf("survived %s\n", argv[1]);
        return 0;
    }
    edges();
    grow();
    threads();
    forked();
    CHECK(pagepool_trim() > 0);
    CHECK(pagepool_write_stats(1) == 0);
    printf("pagepool c test: ok\n");
    return 0;
}
