// The header compiles as C++ and links from it.
#include <pagepool.h>

int main() {
    char *p = static_cast<char *>(pagepool_calloc(1, 1 << 20));
    if (p == nullptr || p[12345] != 0) return 1;
    pagepool_free(p);
    return 0;
}
