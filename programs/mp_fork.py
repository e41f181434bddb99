"""multiprocessing with the fork start method over buffers above the drop-in's threshold.

Children read their parent's arrays (inherited copy-on-write), write their own copies, and
allocate fresh zeroed arrays, which must be zero; the parent's arrays must be intact after.
Prints one deterministic line per check and "mp_fork: ok"; exits 1 on a failed check."""

import hashlib
import multiprocessing as mp
import sys

import numpy as np

SIZES = [1 << 20, 3 << 20, 8 << 20, 24 << 20]
PARENT = {}


def digest(a):
    return hashlib.sha256(a.tobytes()).hexdigest()[:16]


def child(task):
    i, size = task
    a = PARENT[size]
    seen = digest(a)  # the parent's data, as inherited
    a[:] = i + 100  # the child's own copy now
    z = np.zeros(size, dtype=np.uint8)  # fresh zeroed memory in the child
    fresh_zero = bool(not z.any())
    z[::4096] = 1
    e = np.empty(size, dtype=np.uint8)  # malloc'd, written whole
    e.fill(i)
    total = int(e.sum(dtype=np.uint64))
    del z, e
    return i, size, seen, fresh_zero, total


def main():
    for n, size in enumerate(SIZES):
        PARENT[size] = np.full(size, n + 7, dtype=np.uint8)
    before = {size: digest(a) for size, a in PARENT.items()}
    ctx = mp.get_context("fork")
    tasks = [(i, size) for i in range(8) for size in SIZES]
    # One task per child: each starts from the parent's memory, as forked.
    with ctx.Pool(4, maxtasksperchild=1) as pool:
        results = pool.map(child, tasks, chunksize=1)
    ok = True
    for i, size, seen, fresh_zero, total in results:
        good = seen == before[size] and fresh_zero and total == i * size
        ok &= good
        print(f"child task {i} size {size}: parent data {seen}, fresh zero {fresh_zero}, sum {total}: {'ok' if good else 'FAILED'}")
    after = {size: digest(a) for size, a in PARENT.items()}
    intact = after == before
    print(f"parent data intact: {intact}")
    # The parent allocates on after its children ran.
    for size in SIZES:
        z = np.zeros(size, dtype=np.uint8)
        ok &= not z.any()
    print("mp_fork: ok" if ok and intact else "mp_fork: FAILED")
    return 0 if ok and intact else 1


if __name__ == "__main__":
    sys.exit(main())
