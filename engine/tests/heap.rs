//! A process with keyed state gives the memory glibc's allocator keeps free back to the system.
//! A test binary of its own: it reads the process's resident memory, which other tests running
//! in the same process would move.
#![cfg(all(target_os = "linux", target_env = "gnu"))]

use freshet_engine::state::{heap, memory::StateMemory};
use std::time::{Duration, Instant};

/// Anonymous resident bytes of this process (resident minus file-backed, from `statm`).
fn anonymous() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: Vec<usize> = statm
        .split_whitespace()
        .map(|n| n.parse().expect("a number"))
        .collect();
    // SAFETY: `sysconf` only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    (pages[1] - pages[2]) * page
}

#[test]
fn blocks_freed_in_the_middle_of_an_arena_go_back_to_the_system() {
    const BLOCK: usize = 24 << 10;
    const BLOCKS: usize = 4096; // 96 MB
    let start = anonymous();
    // allocated and mostly freed on a thread of its own, as RocksDB's threads allocate, with
    // one block in sixteen kept so that no freed run reaches its arena's top (which glibc
    // would return by itself)
    let kept: Vec<Vec<u8>> = std::thread::spawn(|| {
        let blocks: Vec<Vec<u8>> = (0..BLOCKS).map(|i| vec![i as u8 | 1; BLOCK]).collect();
        blocks
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % 16 == 15)
            .map(|(_, b)| b)
            .collect()
    })
    .join()
    .expect("the allocating thread");
    let freed = anonymous();
    assert!(
        freed >= start + (64 << 20),
        "glibc kept the freed blocks resident: {start} bytes before, {freed} after"
    );
    assert!(heap::free() >= 64 << 20, "glibc counts them free");

    // a state memory starts the trimming thread, which returns them within a few seconds
    let _memory = StateMemory::new(8 << 20);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut now = anonymous();
    while now + (48 << 20) > freed && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        now = anonymous();
    }
    assert!(
        now + (48 << 20) <= freed,
        "still {now} bytes resident after trimming, {freed} before"
    );
    // what is kept is intact
    for (i, b) in kept.iter().enumerate() {
        assert!(b.iter().all(|&x| x == ((i * 16 + 15) as u8 | 1)));
    }
}
