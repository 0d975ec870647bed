//! Gives the pages the C allocator holds free back to the system, so a process's resident memory
//! follows what its state holds rather than the most it ever held.
//!
//! RocksDB allocates its cached blocks and memtables with the C library's `malloc`, from any of
//! its threads. With glibc each thread's allocations come from one of several arenas, and a
//! block freed in the middle of an arena stays resident: glibc returns only the free memory at
//! an arena's top on its own. A deduplication of 10M keys held about 100 MB that way, on top
//! of its budget. So a process that runs keyed state checks glibc's free bytes,
//! every second at first, and when they pass a threshold asks glibc to return every free page
//! (`malloc_trim`, a few milliseconds for 100 MB free). Checks slow down while what they
//! release comes right back (see [`next_wait`]). Blocks of a megabyte or more are given
//! mappings of their own whatever was freed before ([`fixed_mmap_threshold`]), so they never
//! linger in an arena. Elsewhere (other C libraries, other systems) this does nothing.
//!
//! The Rust side of the process allocates through [`Allocator`], the system's allocator with
//! large blocks marked for huge pages.
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Once;
use std::time::Duration;

/// Free bytes in the allocator's arenas below which a check does nothing.
const THRESHOLD: usize = 16 << 20;

/// The shortest and the longest wait between two checks.
const FASTEST: Duration = Duration::from_secs(1);
const SLOWEST: Duration = Duration::from_secs(32);

/// Starts the process's trimming thread, once; later calls do nothing.
pub(crate) fn keep_trimmed() {
    static START: Once = Once::new();
    START.call_once(|| {
        if !cfg!(all(target_os = "linux", target_env = "gnu")) {
            return;
        }
        fixed_mmap_threshold();
        let spawned = std::thread::Builder::new()
            .name("freshet-heap-trim".into())
            .spawn(|| {
                let mut wait = FASTEST;
                // what the last trim released, and the resident bytes right after it
                let mut last: Option<(usize, usize)> = None;
                loop {
                    std::thread::sleep(wait);
                    if let Some((released, after)) = last.take() {
                        wait = next_wait(wait, released, anonymous().saturating_sub(after));
                    }
                    if free() >= THRESHOLD {
                        let before = anonymous();
                        trim();
                        let after = anonymous();
                        last = Some((before.saturating_sub(after), after));
                    }
                }
            });
        if let Err(e) = spawned {
            // memory is then only what glibc returns on its own: worth a line, not a failure
            tracing::warn!(error = %e, "could not start the thread that trims the heap");
        }
    });
}

/// The wait before the next check, given the one before it, the bytes the last trim released
/// and how many of them came back since. Memory a process takes back at once (a checkpoint's
/// buffers, each second) costs its page faults again for nothing, so the checks slow down,
/// doubling their wait up to [`SLOWEST`]; memory that stays released brings them back to
/// [`FASTEST`] by halves.
fn next_wait(wait: Duration, released: usize, regrown: usize) -> Duration {
    if released > 0 && regrown >= released / 2 {
        (wait * 2).min(SLOWEST)
    } else {
        (wait / 2).max(FASTEST)
    }
}

/// Anonymous resident bytes of the process (resident minus file-backed pages, from `statm`),
/// 0 if unknown.
fn anonymous() -> usize {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let mut pages = statm.split_whitespace().skip(1).map(str::parse::<usize>);
    match (pages.next(), pages.next()) {
        (Some(Ok(resident)), Some(Ok(shared))) => resident.saturating_sub(shared) * page_size(),
        _ => 0,
    }
}

/// The page size `statm` counts in.
fn page_size() -> usize {
    #[cfg(unix)]
    {
        // SAFETY: `sysconf` only reads a system constant.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size).unwrap_or(4096)
    }
    #[cfg(not(unix))]
    4096
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

/// Blocks of [`MMAP_THRESHOLD`] or more get a mapping of their own, returned to the system as
/// soon as they are freed. glibc's own threshold starts at 128 KB and rises to the size of each
/// such block freed (up to 32 MB), after which blocks that size come from the arenas and stay
/// resident once freed: RocksDB's memtable blocks (2 MB, a new memtable at every checkpoint) and
/// the write batches of a checkpoint did that, and with checkpoints every 250 ms the large-state
/// qw held twice its budget (see BENCHMARKS.md). Fixing the threshold also stops it rising.
fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only sets one of the allocator's parameters, under its lock.
        if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) } != 1 {
            tracing::warn!("could not fix the allocator's threshold for blocks of their own");
        }
    }
}

/// See [`fixed_mmap_threshold`].
const MMAP_THRESHOLD: usize = 1 << 20;

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

/// The process's Rust allocator (the binary installs it with `#[global_allocator]`): the
/// system's, with each block of [`HUGE_FROM`] bytes or more marked for transparent huge pages
/// (`madvise(MADV_HUGEPAGE)`, which kernels set to `madvise` leave to each program). State's
/// large tables (a key set's index, a pane's index and columns, a spill's sorted rows) are read
/// at random, and with 4 KB pages such a read nearly always misses the TLB as well as the
/// caches: the large-state window ran 6–9% faster with 2 MB pages (BENCHMARKS.md). Smaller
/// blocks are left alone: they share pages with other blocks, and glibc gives only blocks of
/// 1 MB or more mappings of their own (see [`fixed_mmap_threshold`]). Elsewhere than Linux it is
/// the system allocator.
pub struct Allocator;

/// See [`Allocator`]: a block this large holds at least one whole huge page.
const HUGE_FROM: usize = 4 << 20;

// SAFETY: every call is passed to `System` unchanged; the advice only changes how the kernel
// backs the pages that hold a block it returned, never their contents.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        if layout.size() >= HUGE_FROM {
            advise_huge(p, layout.size());
        }
        p
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc_zeroed(layout) };
        if layout.size() >= HUGE_FROM {
            advise_huge(p, layout.size());
        }
        p
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if new_size >= HUGE_FROM {
            advise_huge(p, new_size);
        }
        p
    }
}

/// Marks the pages of the `size` bytes at `p` for huge pages: every page the block touches, so
/// a block with a mapping of its own is marked whole. Marking only the huge pages inside it would
/// split the mapping in three, and the kernel's `mremap` moves only a single mapping: glibc's
/// `realloc` of such a block then copies it into a new one, holding both for a moment, where it
/// would have remapped its pages (a key set's index grows that way). A failure (a kernel
/// without huge pages) leaves the block as it was.
#[cold]
#[inline(never)]
fn advise_huge(p: *mut u8, size: usize) {
    #[cfg(target_os = "linux")]
    if !p.is_null() {
        // SAFETY: `sysconf` only reads a constant of the system.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let start = (p as usize) / page * page;
        let end = (p as usize).saturating_add(size).next_multiple_of(page);
        // SAFETY: the pages hold the block just allocated and at most the allocator's own
        // bookkeeping beside it; the advice changes no contents and no mapping's protection.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (p, size);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The address range and `VmFlags` of the mapping of `/proc/self/smaps` that holds address
    /// `at`.
    fn mapping(at: usize) -> Option<(std::ops::Range<usize>, String)> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = None;
        for line in smaps.lines() {
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'));
            if let Some((from, to)) = range
                && let (Ok(from), Ok(to)) = (
                    usize::from_str_radix(from, 16),
                    usize::from_str_radix(to, 16),
                )
            {
                inside = (from..to).contains(&at).then_some(from..to);
            } else if let Some(range) = &inside
                && let Some(flags) = line.strip_prefix("VmFlags:")
            {
                return Some((range.clone(), flags.trim().to_string()));
            }
        }
        None
    }

    #[test]
    fn large_blocks_are_marked_for_huge_pages_whole_and_small_ones_are_not() {
        if !cfg!(target_os = "linux") {
            return;
        }
        // whether the block is marked, and whether one mapping holds all of it
        let marked = |p: *mut u8, size: usize| {
            let (range, flags) = mapping(p as usize).expect("a mapping");
            let whole = range.end >= p as usize + size;
            (flags.split_whitespace().any(|f| f == "hg"), whole)
        };
        let small = Layout::from_size_align(2 << 20, 8).unwrap();
        // SAFETY: a non-zero layout; freed below with the same layout.
        let p = unsafe { Allocator.alloc(small) };
        assert!(!p.is_null());
        assert!(!marked(p, small.size()).0, "a 2 MB block is not marked");
        // SAFETY: allocated above with this layout.
        unsafe { Allocator.dealloc(p, small) };

        let large = Layout::from_size_align(16 << 20, 8).unwrap();
        // SAFETY: a non-zero layout; reallocated and freed below.
        let p = unsafe { Allocator.alloc(large) };
        assert!(!p.is_null());
        // SAFETY: `p` holds `large.size()` bytes.
        unsafe { std::ptr::write_bytes(p, 1, large.size()) };
        assert_eq!(
            marked(p, large.size()),
            (true, true),
            "a 16 MB block, whole"
        );
        // grown, as a key set's index grows: still one mapping, marked, contents kept
        let grown = 40 << 20;
        // SAFETY: `p` was allocated with `large`; the new size is non-zero.
        let q = unsafe { Allocator.realloc(p, large, grown) };
        assert!(!q.is_null());
        assert_eq!(marked(q, grown), (true, true), "grown to 40 MB, whole");
        // SAFETY: the first `large.size()` bytes were copied or remapped from `p`.
        assert!(
            unsafe { std::slice::from_raw_parts(q, large.size()) }
                .iter()
                .all(|&b| b == 1)
        );
        // SAFETY: `q` holds `grown` bytes with `large`'s alignment.
        unsafe { Allocator.dealloc(q, Layout::from_size_align(grown, 8).unwrap()) };
    }

    #[test]
    fn checks_slow_down_while_released_memory_comes_back() {
        let s = Duration::from_secs;
        assert_eq!(
            next_wait(s(1), 100 << 20, 60 << 20),
            s(2),
            "came back: slower"
        );
        assert_eq!(next_wait(s(16), 100 << 20, 50 << 20), s(32));
        assert_eq!(
            next_wait(s(32), 100 << 20, 100 << 20),
            s(32),
            "no slower than that"
        );
        assert_eq!(
            next_wait(s(32), 100 << 20, 10 << 20),
            s(16),
            "stayed away: faster"
        );
        assert_eq!(next_wait(s(1), 100 << 20, 0), s(1), "no faster than that");
        assert_eq!(
            next_wait(s(4), 0, 1 << 20),
            s(2),
            "nothing released: no evidence"
        );
    }

    #[test]
    fn the_resident_anonymous_bytes_are_read() {
        if cfg!(target_os = "linux") {
            assert!(anonymous() > 0);
        }
    }
}
