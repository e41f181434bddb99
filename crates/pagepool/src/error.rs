//! Errors: what can go wrong when configuring a heap or allocating from it.

use std::io;

/// Why an allocation failed. Nothing is leaked when one is returned: every block taken for the
/// failed buffer has gone back to its pool or to the system.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    /// A zero-length buffer was asked for (dma-buf heaps refuse these too).
    #[error("cannot allocate a zero-length buffer")]
    ZeroLength,
    /// The length is above the heap's configured maximum buffer size.
    #[error("buffer of {len} bytes exceeds the heap's maximum of {max} bytes")]
    TooLarge {
        /// The length asked for.
        len: usize,
        /// The heap's maximum buffer size in bytes.
        max: usize,
    },
    /// The operating system refused a request (address space, memory, or a limit ran out).
    #[error(transparent)]
    Os(#[from] OsError),
    /// A locked pool type could not lock fresh memory: the process's locked memory would pass
    /// `RLIMIT_MEMLOCK` (and it lacks `CAP_IPC_LOCK`). Raise the limit (`ulimit -l`,
    /// `LimitMEMLOCK=` in a systemd unit) or lower the heap's use.
    #[error(
        "locking {bytes} more bytes would pass RLIMIT_MEMLOCK ({}); raise it (ulimit -l) or grant CAP_IPC_LOCK",
        match .limit { Some(l) => format!("{l} bytes"), None => "unlimited".to_owned() }
    )]
    MemlockLimit {
        /// The bytes the allocation needed to lock.
        bytes: usize,
        /// The soft limit at the time, in bytes (`None`: unlimited, and the kernel still
        /// refused).
        limit: Option<u64>,
    },
}

/// A system call that failed, with the name of the operation pagepool was performing.
///
/// # Examples
/// ```
/// use pagepool::{AllocError, SystemHeap};
///
/// let heap = SystemHeap::new().unwrap();
/// match heap.alloc(1 << 20) {
///     Ok(buf) => assert_eq!(buf.len(), 1 << 20),
///     Err(AllocError::Os(e)) => eprintln!("{} failed: errno {:?}", e.op(), e.raw_os_error()),
///     Err(e) => panic!("{e}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{op} failed: {source}")]
pub struct OsError {
    op: &'static str,
    #[source]
    source: io::Error,
}

impl OsError {
    pub(crate) fn new(op: &'static str, source: impl Into<io::Error>) -> Self {
        OsError {
            op,
            source: source.into(),
        }
    }

    /// What pagepool was doing (for example `"mmap arena"`).
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// The error the kernel returned.
    pub fn io_error(&self) -> &io::Error {
        &self.source
    }

    /// The kernel's error number (`errno`), such as `libc::ENOMEM` (12).
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    /// The operation and the kernel's error, taken apart.
    pub fn into_parts(self) -> (&'static str, io::Error) {
        (self.op, self.source)
    }
}

/// Why a heap configuration was refused by [`HeapBuilder::build`](crate::HeapBuilder::build).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The list of block orders is empty.
    #[error("no block orders configured")]
    NoOrders,
    /// An order is larger than [`MAX_ORDER`](crate::pool::MAX_ORDER).
    #[error("order {order} is above the largest supported order {max}")]
    OrderTooLarge {
        /// The order asked for.
        order: u8,
        /// The largest order pagepool serves.
        max: u8,
    },
    /// Order 0 is missing, so lengths that are not a multiple of a larger block could not be built.
    #[error("the orders must include 0 so that every page-rounded length can be built")]
    MissingOrderZero,
    /// The same order appears twice.
    #[error("order {0} is listed twice")]
    DuplicateOrder(u8),
    /// The maximum buffer size is zero.
    #[error("max_buffer must be at least 1 byte")]
    ZeroMaxBuffer,
    /// A huge pool type's orders must all be at least [`HUGE_ORDER`](crate::pool::HUGE_ORDER) (2 MiB
    /// blocks), and include it.
    #[error(
        "a huge pool type needs orders of at least {min} (2 MiB blocks), including {min}; got {got:?}"
    )]
    HugeOrders {
        /// The orders asked for.
        got: Vec<u8>,
        /// The smallest order a huge pool type serves.
        min: u8,
    },
    /// The NUMA node asked for does not exist or has no memory.
    #[error("NUMA node {node} does not exist or has no memory (nodes with memory: {available})")]
    NoSuchNode {
        /// The node asked for.
        node: u32,
        /// The nodes with memory, as the system lists them (`0-1`).
        available: String,
    },
    /// The arena size is smaller than the largest block.
    #[error("arena_size {arena} bytes is smaller than the largest block ({block} bytes)")]
    ArenaTooSmall {
        /// The arena size asked for.
        arena: usize,
        /// The size of the largest configured block.
        block: usize,
    },
    /// A size is larger than any system can map: `field` is the [`HeapBuilder`] setting
    /// (`"arena_size"`), `max` the largest value it accepts (after rounding up to pages, or
    /// to 2 MiB for a huge pool type).
    ///
    /// [`HeapBuilder`]: crate::HeapBuilder
    ///
    /// # Examples
    /// ```
    /// use pagepool::{ConfigError, SystemHeap};
    ///
    /// let err = SystemHeap::builder().arena_size(usize::MAX).build().unwrap_err();
    /// assert!(matches!(err, ConfigError::SizeTooLarge { field: "arena_size", .. }));
    /// assert!(err.to_string().starts_with("arena_size 18446744073709551615 bytes is above"));
    /// ```
    #[error("{field} {value} bytes is above the largest supported, {max} bytes")]
    SizeTooLarge {
        /// The builder setting (`"arena_size"`).
        field: &'static str,
        /// The value asked for, in bytes.
        value: usize,
        /// The largest value accepted, in bytes.
        max: usize,
    },
}
