//! Gives the pages the C allocator holds free back to the system, so a process's resident memory
//! follows what its state holds rather than the most it ever held.
//!
//! RocksDB allocates its cached blocks and memtables with the C library's `malloc`, from any of
//! its threads. With glibc each thread's allocations come from one of several arenas, and a
//! block freed in the middle of an arena stays resident: glibc returns only the free memory at
//! an arena's top on its own. A deduplication at ten times its budget held about 100 MB that
//! way, on top of its budget. So a process that runs keyed state checks glibc's free bytes once
//! a second and, when they pass a threshold, asks glibc to return every free page
//! (`malloc_trim`, a few milliseconds for 100 MB free). Elsewhere (other C libraries, other
//! systems) this does nothing.
use std::sync::Once;
use std::time::Duration;

/// Free bytes in the allocator's arenas below which a check does nothing.
const THRESHOLD: usize = 16 << 20;

/// How often the trimming thread looks.
const PERIOD: Duration = Duration::from_secs(1);

/// Starts the process's trimming thread, once; later calls do nothing.
pub(crate) fn keep_trimmed() {
    static START: Once = Once::new();
    START.call_once(|| {
        if !cfg!(all(target_os = "linux", target_env = "gnu")) {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("freshet-heap-trim".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(PERIOD);
                    if free() >= THRESHOLD {
                        trim();
                    }
                }
            });
        if let Err(e) = spawned {
            // memory is then only what glibc returns on its own: worth a line, not a failure
            tracing::warn!(error = %e, "could not start the thread that trims the heap");
        }
    });
}

/// Bytes free in the allocator's arenas (released pages included: glibc counts a chunk free
/// whether or not its pages are still resident).
pub fn free() -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallinfo2` only reads the allocator's counters; it takes no argument.
        unsafe { libc::mallinfo2() }.fordblks
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    0
}

/// Returns every free page of the allocator's arenas to the system; whether any was returned.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `malloc_trim` only walks the allocator's own free lists, under its locks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}
