//! The memory keyed state may use: a budget per task slot, shared by every state instance of a
//! job in one process.
//!
//! **The memory model.** `state.memory_mb` (M) is what keyed state may use in one task slot,
//! whatever the number of stateful operators the slot runs. A quarter of it is RocksDB's: one
//! clock block cache per job and process holds data blocks, index and filter partitions, and the
//! memtables, which a write-buffer manager charges to it and flushes once they reach half of it.
//! The other three quarters are the decoded-key caches in front of RocksDB (keyed tables' maps,
//! key sets' indexes, pane tables), counted in bytes, with the filters of the keys they evicted
//! (2 bytes per key of capacity, which grows fourfold; half of the decoded share at most per
//! range of namespaces; they let a miss skip RocksDB, see `state::spilled`). The split favours the decoded
//! caches because every state access goes to them first and RocksDB's cache serves only what
//! they miss: with three quarters, the 10M-key deduplication of `freshet bench state` holds all
//! its keys in memory, where with half it read RocksDB for two thirds of its second visits and
//! ran 5.5 to 7.3 times slower (BENCHMARKS.md). A process that runs keyed state for
//! `s` slots of a job therefore holds about `s × M` of it (the decoded caches are estimates); the
//! rest of a process (network buffers, batches in flight, the binary) comes on top. The cache
//! grows and shrinks as slots open and close state. What the C allocator keeps free after the
//! cache evicts is given back to the system by a thread that looks every 1 to 32 seconds
//! (`state::heap`).
//!
//! The decoded-key caches share their part by need: a table evicts when its own bytes pass the
//! whole of it, or when the tables together pass it and the table holds more than a quarter of an
//! equal share ([`StateMemory::must_evict`]), so a large table yields to a small one.
use parking_lot::Mutex;
use rocksdb::{Cache, WriteBufferManager};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// RocksDB's part of `bytes` of keyed-state memory; the decoded-key caches have the rest.
fn rocksdb_share(bytes: usize) -> usize {
    bytes / 4
}

/// The keyed-state memory of one job in one process.
pub struct StateMemory {
    per_slot: usize,
    cache: Cache,
    write_buffers: WriteBufferManager,
    /// Open state instances per slot.
    slots: Mutex<HashMap<u32, usize>>,
    slot_count: AtomicUsize,
    decoded: AtomicUsize,
    tables: AtomicUsize,
}

impl std::fmt::Debug for StateMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMemory")
            .field("per_slot", &self.per_slot)
            .field("slots", &self.slot_count.load(Ordering::Relaxed))
            .field("decoded", &self.decoded.load(Ordering::Relaxed))
            .finish()
    }
}

/// A slot's claim on the budget, held by each state instance; the last one of a slot gives the
/// slot's share back.
#[derive(Debug)]
pub struct Lease {
    memory: Arc<StateMemory>,
    slot: u32,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut slots = self.memory.slots.lock();
        if let Some(n) = slots.get_mut(&self.slot) {
            *n -= 1;
            if *n == 0 {
                slots.remove(&self.slot);
            }
        }
        self.memory.resize(slots.len());
    }
}

impl StateMemory {
    /// The bytes per slot a budget asked for `per_slot` has (there is a floor).
    pub fn new_per_slot(per_slot: usize) -> usize {
        per_slot.max(8 << 20)
    }

    /// A budget of `per_slot` bytes per slot, with no slot open yet.
    pub fn new(per_slot: usize) -> Arc<Self> {
        let per_slot = Self::new_per_slot(per_slot);
        super::heap::keep_trimmed();
        // a clock cache finds a block without taking a lock or moving it in a list, which a
        // lookup in an LRU cache does: with many lookups per record once state outgrows memory,
        // that was a tenth of a deduplication's time (the entry charge is found as it runs)
        let cache = Cache::new_hyper_clock_cache(rocksdb_share(per_slot), 0);
        let write_buffers = WriteBufferManager::new_write_buffer_manager_with_cache(
            rocksdb_share(per_slot) / 2,
            false,
            cache.clone(),
        );
        Arc::new(StateMemory {
            per_slot,
            cache,
            write_buffers,
            slots: Mutex::new(HashMap::new()),
            slot_count: AtomicUsize::new(0),
            decoded: AtomicUsize::new(0),
            tables: AtomicUsize::new(0),
        })
    }

    /// Claims slot `slot`'s share for one state instance.
    pub fn lease(self: &Arc<Self>, slot: u32) -> Lease {
        let mut slots = self.slots.lock();
        *slots.entry(slot).or_default() += 1;
        self.resize(slots.len());
        Lease {
            memory: self.clone(),
            slot,
        }
    }

    fn resize(&self, slots: usize) {
        let slots = slots.max(1);
        self.slot_count.store(slots, Ordering::Relaxed);
        let rocksdb = rocksdb_share(slots * self.per_slot);
        self.cache.clone().set_capacity(rocksdb);
        self.write_buffers.set_buffer_size(rocksdb / 2);
    }

    /// The block cache every instance of the job in this process shares.
    pub(crate) fn cache(&self) -> &Cache {
        &self.cache
    }

    /// The write-buffer manager every instance of the job in this process shares.
    pub(crate) fn write_buffers(&self) -> &WriteBufferManager {
        &self.write_buffers
    }

    /// Bytes per slot.
    pub fn per_slot(&self) -> usize {
        self.per_slot
    }

    /// Bytes the decoded-key caches may hold together.
    pub fn decoded_budget(&self) -> usize {
        let all = self.slot_count.load(Ordering::Relaxed).max(1) * self.per_slot;
        all - rocksdb_share(all)
    }

    /// Bytes the decoded-key caches hold (estimated).
    pub fn decoded(&self) -> usize {
        self.decoded.load(Ordering::Relaxed)
    }

    /// Bytes RocksDB's block cache holds, memtables included.
    pub fn rocksdb(&self) -> usize {
        self.cache.get_usage()
    }

    pub(crate) fn add_table(&self) {
        self.tables.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn remove_table(&self, bytes: usize) {
        self.tables.fetch_sub(1, Ordering::Relaxed);
        self.charge(bytes, 0);
    }

    pub(crate) fn charge(&self, old: usize, new: usize) {
        if new >= old {
            self.decoded.fetch_add(new - old, Ordering::Relaxed);
        } else {
            // never below zero, even if a table's estimate went wrong
            let less = old - new;
            let _ = self
                .decoded
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                    Some(d.saturating_sub(less))
                });
        }
    }

    /// Whether a table holding `own` bytes must evict.
    pub(crate) fn must_evict(&self, own: usize) -> bool {
        self.must_evict_at(own, own)
    }

    /// Whether a table now charged `now` bytes would have to evict if it held `then`: as
    /// [`Self::must_evict`], with the job's total moved by the difference.
    pub(crate) fn must_evict_at(&self, now: usize, then: usize) -> bool {
        let budget = self.decoded_budget();
        if then > budget {
            return true;
        }
        let share = budget / self.tables.load(Ordering::Relaxed).max(1);
        let total = (self.decoded() + then).saturating_sub(now);
        total > budget && then > share / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_follows_the_slots_that_hold_state() {
        let m = StateMemory::new(64 << 20);
        let a = m.lease(0);
        let b = m.lease(0);
        assert_eq!(
            m.decoded_budget(),
            48 << 20,
            "three quarters of one slot, however many instances"
        );
        let c = m.lease(3);
        assert_eq!(m.decoded_budget(), 96 << 20);
        drop(c);
        drop(a);
        assert_eq!(m.decoded_budget(), 48 << 20);
        drop(b);
    }

    #[test]
    fn a_large_table_yields_to_a_small_one() {
        let m = StateMemory::new(64 << 20);
        let _l = m.lease(0);
        m.add_table();
        m.add_table();
        assert_eq!(m.decoded_budget(), 48 << 20);
        m.charge(0, 45 << 20); // the large table
        m.charge(0, 1 << 20); // the small one
        assert!(!m.must_evict(45 << 20), "within the budget together");
        m.charge(1 << 20, 4 << 20);
        assert!(
            m.must_evict(45 << 20),
            "over together: the large one evicts"
        );
        assert!(
            !m.must_evict(4 << 20),
            "the small one keeps growing up to a quarter of its share"
        );
        assert!(m.must_evict(49 << 20), "alone above the budget");
        // 49 MB together: the large table would be within the budget at 44 MB, not at 44.5
        assert!(!m.must_evict_at(45 << 20, 44 << 20));
        assert!(m.must_evict_at(45 << 20, (44 << 20) + (512 << 10)));
    }
}
