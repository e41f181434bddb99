"""Real workloads for heap-bench's programs mode, one per process:

    python workloads.py NAME [ARG]

prints one line of JSON: {"name", "seconds", "cpu_seconds", "check"}. `seconds` and
`cpu_seconds` (the whole process: every thread, an allocator's worker included) cover the
workload only, not the interpreter's start or the imports; `check` is a value the workload
computed, the same under every allocator. heap-bench runs each under glibc and each preload
and reads the process's peak resident memory itself.
"""

import json
import sys
import time

# About 0.3 ms of Python work on this project's machines: what a program does between two
# large allocations in the paced loops.
WORK = 4000


def python_work():
    x = 0
    for i in range(WORK):
        x += i
    return x


def zeros_paced(size):
    """600 np.zeros of `size` bytes, one byte written per page, Python work between."""
    import numpy as np

    check = 0
    for _ in range(600):
        a = np.zeros(size, dtype=np.uint8)
        a[::4096] = 1
        check += int(a[-1]) + python_work() % 7
        del a
    return check


def zeros_floor(size):
    """The paced loop over one buffer allocated once: what allocation costs nothing would take."""
    import numpy as np

    check = 0
    a = np.zeros(size, dtype=np.uint8)
    for _ in range(600):
        a[::4096] = 1
        check += int(a[-1]) + python_work() % 7
    return check


def zeros_tight(size):
    """np.zeros of `size` bytes back to back (200 calls), one byte written per page."""
    import numpy as np

    check = 0
    for _ in range(200):
        a = np.zeros(size, dtype=np.uint8)
        a[::4096] = 1
        check += int(a[0])
        del a
    return check


def arithmetic(_):
    """Arithmetic on 32 MiB float64 arrays: every expression makes temporaries by malloc."""
    import numpy as np

    a = np.arange(4 << 20, dtype=np.float64)
    b = np.ones(4 << 20, dtype=np.float64) * 0.5
    s = 0.0
    for _ in range(40):
        c = a * b + a - b * 2.0
        s += float(c[::65536].sum())
    return s


def pillow(_):
    """Pillow: image creation (calloc'd blocks) and a resize pipeline."""
    from PIL import Image

    check = 0
    for i in range(30):
        im = Image.new("RGB", (2048, 1536), (i, 2 * i, 3 * i))
        small = im.resize((1024, 768), Image.BILINEAR).rotate(90, expand=True)
        big = small.resize((3000, 2000), Image.NEAREST)
        check += big.getpixel((5, 5))[0] + small.size[0]
    return check


def compress_lzma(_):
    """lzma compression, a call per 4 MiB buffer."""
    import lzma

    data = bytes(range(256)) * (16 << 10)
    total = 0
    for i in range(12):
        total += len(lzma.compress(data[i:] + data[:i], preset=1))
    return total


def compress_zstd(_):
    """zstandard compression, a call (and a compressor) per 4 MiB buffer."""
    import zstandard

    data = bytes(range(256)) * (16 << 10)
    total = 0
    for i in range(60):
        total += len(zstandard.ZstdCompressor(level=3).compress(data[i:] + data[:i]))
    return total


def sqlite_index(_):
    """SQLite: 200,000 rows into an in-memory database with a 64 MiB page cache, an index."""
    import sqlite3

    db = sqlite3.connect(":memory:")
    db.execute("PRAGMA cache_size=-65536")
    db.execute("CREATE TABLE t(a INTEGER, b TEXT)")
    db.executemany(
        "INSERT INTO t VALUES (?, ?)",
        (((i * 7919) % 200003, f"row {i}") for i in range(200000)),
    )
    db.execute("CREATE INDEX t_a ON t(a)")
    return db.execute("SELECT count(*), sum(a) FROM t WHERE a > 1000").fetchone()[1]


WORKLOADS = {
    "zeros-paced": zeros_paced,
    "zeros-floor": zeros_floor,
    "zeros-tight": zeros_tight,
    "arithmetic": arithmetic,
    "pillow": pillow,
    "lzma": compress_lzma,
    "zstd": compress_zstd,
    "sqlite": sqlite_index,
}


def main():
    name = sys.argv[1]
    arg = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    f = WORKLOADS[name]
    # The imports outside the timed part.
    if name.startswith("zeros") or name == "arithmetic":
        import numpy  # noqa: F401
    elif name == "pillow":
        import PIL.Image  # noqa: F401
    elif name == "zstd":
        import zstandard  # noqa: F401
    t0, c0 = time.perf_counter(), time.process_time()
    check = f(arg)
    t1, c1 = time.perf_counter(), time.process_time()
    print(json.dumps({"name": name, "seconds": t1 - t0, "cpu_seconds": c1 - c0, "check": check}))


if __name__ == "__main__":
    main()
