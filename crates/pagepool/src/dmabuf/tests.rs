//! The dma-buf unit tests: names and errors, udmabuf and fdinfo, the ioctl numbers, and the
//! atomic copies of [`SharedMem`]. Kept apart from the code they test so that each file stays
//! readable on its own.

use super::shared::WORD;
use super::udmabuf::UDMABUF_CREATE_LIST;
use super::*;

#[test]
fn bad_names_are_refused() {
    for name in ["", "a/b", "..", ".", "x\0y"] {
        assert!(
            matches!(DmaHeap::open(name), Err(DmaBufError::InvalidName(_))),
            "{name:?}"
        );
    }
}

#[test]
fn a_missing_heap_is_a_clear_error() {
    let e = DmaHeap::open("no-such-heap-here").unwrap_err();
    assert!(matches!(e, DmaBufError::NoHeap { .. }));
    assert!(e.to_string().contains("/dev/dma_heap/no-such-heap-here"));
}

#[test]
fn udmabuf_errors_are_clear() {
    assert!(matches!(udmabuf_create(&[]), Err(DmaBufError::ZeroLength)));
    let fd = crate::os::memfd("pagepool-test", 4096).unwrap();
    match udmabuf_create(&[(fd.as_fd(), 0, 4096)]) {
        Err(DmaBufError::NoHeap { path, .. }) => assert_eq!(path, PathBuf::from(UDMABUF_PATH)),
        Ok(buf) => assert_eq!(buf.len(), 4096), // a machine with /dev/udmabuf
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn file_count_reads_fdinfo() {
    let fd = crate::os::memfd("pagepool-test", 4096).unwrap();
    // Regular files show no count: line.
    assert!(file_count(fd.as_fd()).is_err());
}

/// `len` bytes of `fd` from offset 0, mapped shared; unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: BorrowedFd<'_>, len: usize) -> Mapping {
        // SAFETY: a null hint without MAP_FIXED: the kernel picks an unused range.
        let p = unsafe {
            rustix::mm::mmap(
                ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }
        .unwrap();
        Mapping {
            ptr: NonNull::new(p.cast()).unwrap(),
            len,
        }
    }

    /// The first `len` bytes as shared memory.
    fn mem(&self, len: usize) -> SharedMem {
        assert!(len <= self.len);
        // SAFETY: a page-aligned mapping of at least `len` bytes, alive while the test
        // uses the value; the tests reach it only through `SharedMem`.
        unsafe { SharedMem::new(self.ptr, len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no `SharedMem` of it is used any more.
        unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) }.unwrap();
    }
}

fn page() -> usize {
    crate::os::page_size()
}

fn one_page() -> (OwnedFd, Mapping) {
    let fd = crate::os::memfd("pagepool-test", page()).unwrap();
    let map = Mapping::new(fd.as_fd(), page());
    (fd, map)
}

fn contents(mem: &SharedMem) -> Vec<u8> {
    let mut v = vec![0; mem.len()];
    mem.read(0, &mut v).unwrap();
    v
}

#[test]
fn shared_copies_match_a_model_at_every_offset_and_length() {
    let (_fd, map) = one_page();
    let whole = map.mem(page());
    whole.fill(0xee);
    // An odd length: the last word is partly outside the memory.
    let len = 61;
    let mem = map.mem(len);
    let mut model = vec![0xee; len];
    for offset in 0..=len {
        for n in 0..=len - offset {
            let data: Vec<u8> = (0..n).map(|k| (offset * 31 + n * 7 + k) as u8).collect();
            mem.write(offset, &data).unwrap();
            model[offset..offset + n].copy_from_slice(&data);
            let mut back = vec![0; n];
            mem.read(offset, &mut back).unwrap();
            assert_eq!(back, data, "at {offset}, {n} bytes");
            assert_eq!(contents(&mem), model, "after writing {n} bytes at {offset}");
        }
    }
    for offset in 0..=len {
        for n in 0..=len - offset {
            let mut back = vec![0; n];
            mem.read(offset, &mut back).unwrap();
            assert_eq!(back, model[offset..offset + n], "at {offset}, {n} bytes");
        }
    }
    // Nothing past the end was touched, not even in the last word.
    assert!(contents(&whole)[len..].iter().all(|&b| b == 0xee));
}

#[test]
fn shared_fill_covers_exactly_the_memory() {
    let (_fd, map) = one_page();
    let whole = map.mem(page());
    for len in [0, 1, 7, 8, 9, 61, 64, page() - 3, page()] {
        whole.fill(0xee);
        let mem = map.mem(len);
        mem.fill(0x5a);
        let all = contents(&whole);
        assert!(all[..len].iter().all(|&b| b == 0x5a), "len {len}");
        assert!(all[len..].iter().all(|&b| b == 0xee), "len {len}");
    }
}

#[test]
fn shared_copies_out_of_range_are_errors_and_touch_nothing() {
    let (_fd, map) = one_page();
    let mem = map.mem(61);
    mem.fill(1);
    let mut buf = [0; 64];
    mem.read(61, &mut buf[..0]).unwrap(); // empty, at the end: fine
    mem.write(61, &[]).unwrap();
    let cases: [(usize, usize); 6] = [
        (62, 0),
        (61, 1),
        (60, 2),
        (0, 62),
        (usize::MAX, 1),
        (usize::MAX, 0),
    ];
    for (offset, n) in cases {
        let e = mem.read(offset, &mut buf[..n]).unwrap_err();
        assert!(
            matches!(e, DmaBufError::OutOfRange { offset: o, len: l, size: 61 } if o == offset && l == n),
            "{e:?}"
        );
        assert!(mem.write(offset, &[9; 64][..n]).is_err());
    }
    let big = vec![9; 100];
    assert!(mem.write(1, &big).is_err());
    assert!(
        contents(&mem).iter().all(|&b| b == 1),
        "a failed write wrote"
    );
    let e = mem.write(60, &[0, 0]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "2 bytes at offset 60 are outside the buffer of 61 bytes"
    );
}

#[test]
fn two_mappings_of_the_same_pages_see_each_others_copies() {
    let fd = crate::os::memfd("pagepool-test", 2 * page()).unwrap();
    let (a, b) = (
        Mapping::new(fd.as_fd(), 2 * page()),
        Mapping::new(fd.as_fd(), 2 * page()),
    );
    let (a, b) = (a.mem(2 * page()), b.mem(2 * page()));
    let at = page() - 5; // across the page boundary, unaligned at both ends
    a.write(at, b"0123456789abc").unwrap();
    let mut back = [0; 13];
    b.read(at, &mut back).unwrap();
    assert_eq!(&back, b"0123456789abc");
    b.fill(0);
    a.read(at, &mut back).unwrap();
    assert_eq!(back, [0; 13]);
}

#[test]
fn racing_writes_to_neighbouring_bytes_lose_nothing() {
    // Two threads write alternate bytes, so that every word is shared and every write
    // merges into a word the other thread writes too; each checks that its own bytes keep
    // what it wrote (a merge that wrote back a stale neighbour would undo it). A third
    // thread reads all along.
    let (_fd, map) = one_page();
    let len = 67;
    map.mem(len).fill(0);
    let (ptr, rounds) = (map.ptr.as_ptr().addr(), 2000_usize);
    let mem = move || {
        // SAFETY: the mapping outlives the scope below; only `SharedMem`s reach it.
        unsafe { SharedMem::new(NonNull::new(ptr as *mut u8).unwrap(), len) }
    };
    let start = std::sync::Barrier::new(3);
    std::thread::scope(|s| {
        for parity in 0..2 {
            let start = &start;
            s.spawn(move || {
                let mem = mem();
                start.wait();
                for round in 1..=rounds {
                    let value = round as u8;
                    for i in (parity..len).step_by(2) {
                        mem.write(i, &[value]).unwrap();
                        let mut mine = [0];
                        for j in (parity..=i).step_by(2) {
                            mem.read(j, &mut mine).unwrap();
                            assert_eq!(mine[0], value, "byte {j} lost round {round}");
                        }
                    }
                }
            });
        }
        let start = &start;
        s.spawn(move || {
            let mem = mem();
            start.wait();
            for _ in 0..rounds {
                let mut v = vec![0; len];
                mem.read(0, &mut v).unwrap();
                // Each word is read at once; in it, each thread's bytes were written in
                // order, round after round: this round's, then the last round's.
                for word in v.chunks(WORD) {
                    for parity in 0..2 {
                        let mine: Vec<u8> = word.iter().copied().skip(parity).step_by(2).collect();
                        assert!(
                            mine.windows(2)
                                .all(|w| w[0] == w[1] || w[0] == w[1].wrapping_add(1)),
                            "{v:?}"
                        );
                    }
                }
            }
        });
    });
    assert!(contents(&mem()).iter().all(|&b| b == rounds as u8));
}

#[test]
fn ioctl_numbers_match_the_kernel_headers() {
    // _IOWR('H', 0, 24 bytes) and _IOW('b', 0, 8 bytes), from <linux/dma-heap.h> and
    // <linux/dma-buf.h>.
    assert_eq!(DMA_HEAP_IOCTL_ALLOC as u64, 0xc018_4800);
    assert_eq!(DMA_BUF_IOCTL_SYNC as u64, 0x4008_6200);
    // _IOW('u', 0x43, 8 bytes) from <linux/udmabuf.h>.
    assert_eq!(UDMABUF_CREATE_LIST as u64, 0x4008_7543);
}
