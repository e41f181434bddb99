/* The drop-in from a C program (run with LD_PRELOAD=libpagepool_preload.so): pointers made
 * before the drop-in was ready, glibc's edge cases, every alignment, threads freeing each
 * other's buffers, fork, and a library opened with RTLD_DEEPBIND. Prints "preload test: ok"
 * and exits 0, or names the first failed check and exits 1. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

extern void *early_big, *early_small, *early_zeroed;

#define CHECK(c)                                                                     \
    do {                                                                             \
        if (!(c)) {                                                                  \
            fprintf(stderr, "preload test: %s:%d: failed: %s\n", __FILE__, __LINE__, #c); \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

static int all(const void *p, int byte, size_t n) {
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++)
        if (c[i] != (unsigned char)byte) return 0;
    return 1;
}

/* Blocks of the pools are aligned to their size (a power of two of at least 64 KiB);
 * glibc's large chunks sit 16 bytes past a page. */
static int pooled(const void *p) { return ((uintptr_t)p & 0xffff) == 0; }

static void early_pointers(void) {
    CHECK(early_big && early_small && early_zeroed);
    CHECK(!pooled(early_big) && !pooled(early_zeroed)); /* glibc's: the drop-in was not ready */
    CHECK(all(early_zeroed, 0, 2 << 20));
    CHECK(malloc_usable_size(early_big) >= (1 << 20));
    /* realloc of a pointer made before the drop-in was ready: into the pools, contents kept */
    char *b = realloc(early_big, 8 << 20);
    CHECK(b && pooled(b) && all(b, 0x3c, 1 << 20));
    char *s = realloc(early_small, 200);
    CHECK(s && all(s, 0x3d, 100));
    free(b);
    free(s);
    free(early_zeroed);
}

static void edges(void) {
    void *p = malloc(0);
    CHECK(p != NULL);
    free(p);
    free(NULL);
    CHECK(malloc_usable_size(NULL) == 0);
    p = realloc(NULL, 1 << 20);
    CHECK(p && pooled(p));
    CHECK(malloc_usable_size(p) >= (1 << 20));
    errno = 1234;
    free(p);
    CHECK(errno == 1234); /* free keeps errno */
    p = malloc(4 << 20);
    CHECK(p && pooled(p));
    CHECK(realloc(p, 0) == NULL); /* freed, as glibc does */
    volatile size_t half = SIZE_MAX / 2; /* unknown to the compiler: no warning */
    errno = 0;
    CHECK(calloc(half, 3) == NULL && errno == ENOMEM);
    errno = 0;
    CHECK(reallocarray(NULL, half, 3) == NULL && errno == ENOMEM);
    p = reallocarray(NULL, 1024, 1024);
    CHECK(p && pooled(p));
    free(p);
    /* calloc after dirty frees: zero */
    for (int i = 0; i < 16; i++) {
        char *d = malloc(3 << 20);
        CHECK(d);
        memset(d, 0xee, 3 << 20);
        free(d);
        char *z = calloc(3 << 20, 1);
        CHECK(z && all(z, 0, 3 << 20));
        free(z);
    }
    /* growth by small steps keeps the contents */
    char *g = NULL;
    size_t n = 0;
    for (size_t want = 4096; want <= (24u << 20); want += 96 << 10) {
        g = realloc(g, want);
        CHECK(g);
        memset(g + n, (int)(want & 0x7f), want - n);
        CHECK(g[0] == (char)(4096 & 0x7f));
        n = want;
    }
    free(g);
    /* malloc_trim drains the pools too: memory went back */
    free(malloc(4 << 20));
    CHECK(malloc_trim(0) == 1);
}

static void alignments(void) {
    size_t sizes[] = {1, 100 << 10, 3 << 20};
    for (size_t a = 8; a <= (2u << 20); a *= 2) {
        for (int s = 0; s < 3; s++) {
            void *p = NULL;
            CHECK(posix_memalign(&p, a, sizes[s]) == 0 && p && ((uintptr_t)p % a) == 0);
            memset(p, 1, sizes[s]);
            free(p);
            p = aligned_alloc(a, sizes[s]);
            CHECK(p && ((uintptr_t)p % a) == 0);
            free(p);
            p = memalign(a, sizes[s]);
            CHECK(p && ((uintptr_t)p % a) == 0);
            free(p);
        }
    }
    void *p = NULL;
    CHECK(posix_memalign(&p, 24, 100) == EINVAL);
    CHECK(posix_memalign(&p, 4, 100) == EINVAL);
    p = valloc(200 << 10);
    CHECK(p && ((uintptr_t)p % 4096) == 0);
    free(p);
    p = pvalloc(1);
    CHECK(p && ((uintptr_t)p % 4096) == 0 && malloc_usable_size(p) >= 4096);
    free(p);
}

#define THREADS 8
#define ROUNDS 300
static void *slots[64];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void *worker(void *arg) {
    unsigned x = (unsigned)(uintptr_t)arg * 2654435761u + 1;
    for (int i = 0; i < ROUNDS; i++) {
        x = x * 1103515245u + 12345u;
        size_t size = (size_t)4096 << (x >> 8) % 13; /* 4 KiB .. 16 MiB */
        int zeroed = (x >> 4) & 1;
        unsigned char *p = zeroed ? calloc(size, 1) : malloc(size);
        if (!p) return "no memory";
        if (zeroed && !(all(p, 0, size < 8192 ? size : 8192) && all(p + size - 4096, 0, 4096)))
            return "calloc not zero";
        memset(p, (int)(x & 0xff), size);
        p[0] = (unsigned char)size;
        pthread_mutex_lock(&lock);
        int k = (x >> 16) % 64;
        void *old = slots[k];
        slots[k] = p;
        pthread_mutex_unlock(&lock);
        free(old); /* often another thread's */
    }
    return NULL;
}

static void threads(void) {
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++) CHECK(pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i + 1)) == 0);
    for (int i = 0; i < THREADS; i++) {
        void *r;
        CHECK(pthread_join(t[i], &r) == 0);
        if (r) {
            fprintf(stderr, "preload test: thread %d: %s\n", i, (char *)r);
            exit(1);
        }
    }
    for (int k = 0; k < 64; k++) free(slots[k]);
}

static void forks(void) {
    char *mine = calloc(4 << 20, 1);
    CHECK(mine && pooled(mine));
    memset(mine, 0x51, 4 << 20);
    for (int round = 0; round < 4; round++) {
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            if (!all(mine, 0x51, 4 << 20)) _exit(10);
            memset(mine, 0x77, 4 << 20); /* its own copy */
            for (int i = 0; i < 8; i++) {
                char *z = calloc(6 << 20, 1);
                if (!z || !all(z, 0, 6 << 20)) _exit(11);
                memset(z, 0x99, 6 << 20);
                free(z);
            }
            free(mine);
            char *again = malloc(4 << 20);
            if (!again) _exit(12);
            free(again);
            _exit(0);
        }
        int st;
        CHECK(waitpid(pid, &st, 0) == pid);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
        CHECK(all(mine, 0x51, 4 << 20));
    }
    free(mine);
}

static void deepbind(const char *lib) {
    void *h = dlopen(lib, RTLD_NOW | RTLD_DEEPBIND);
    CHECK(h != NULL);
    void (*deep_free)(void *) = (void (*)(void *))dlsym(h, "deep_free");
    void *(*deep_malloc)(size_t) = (void *(*)(size_t))dlsym(h, "deep_malloc");
    void *(*deep_realloc)(void *, size_t) = (void *(*)(void *, size_t))dlsym(h, "deep_realloc");
    CHECK(deep_free && deep_malloc && deep_realloc);
    for (int i = 0; i < 8; i++) {
        void *p = malloc(4 << 20);
        CHECK(p && pooled(p));
        deep_free(p); /* glibc's free would abort on a pointer of the pools */
        void *q = deep_malloc(2 << 20);
        CHECK(q && pooled(q));
        q = deep_realloc(q, 9 << 20);
        CHECK(q);
        free(q);
    }
    CHECK(dlclose(h) == 0);
}

int main(int argc, char **argv) {
    CHECK(argc == 2); /* the RTLD_DEEPBIND library's path */
    early_pointers();
    edges();
    alignments();
    threads();
    forks();
    deepbind(argv[1]);
    printf("preload test: ok\n");
    return 0;
}
