//! Channels between subtasks, looked up by name.
//!
//! A channel is named by (job, attempt, edge, producing subtask, consuming subtask). Whichever
//! side asks first creates it; each side takes its own end once. Within one process both ends are
//! a bounded in-memory channel; a channel from another process is the same, with its sending end
//! held by the [`network`](crate::network) (see [`LocalShuffle::inbound`]). Channels of different attempts never mix, so a restarted job
//! cannot read a previous attempt's data.
use std::collections::HashMap;
use std::sync::Mutex;

use freshet_engine::channel::{ChannelReceiver, ChannelSender, CreditSlot, bounded};
use freshet_jobmanager::JobId;

/// The name of one channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    /// Job.
    pub job: JobId,
    /// Attempt.
    pub attempt: u32,
    /// Edge index in the plan.
    pub edge: usize,
    /// Producing subtask.
    pub from: u32,
    /// Consuming subtask.
    pub to: u32,
}

#[derive(Default)]
struct Pair {
    tx: Option<ChannelSender>,
    rx: Option<ChannelReceiver>,
    slot: Option<CreditSlot>,
    taken: u8,
}

/// The channels of every subtask in this process.
#[derive(Default)]
pub struct LocalShuffle {
    channels: Mutex<HashMap<ChannelKey, Pair>>,
}

impl LocalShuffle {
    /// No channels yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn take<T>(
        &self,
        key: ChannelKey,
        capacity: usize,
        pick: impl FnOnce(&mut Pair) -> Option<T>,
    ) -> T {
        self.try_take(key, capacity, pick)
            .expect("each end of a channel is taken once")
    }

    fn try_take<T>(
        &self,
        key: ChannelKey,
        capacity: usize,
        pick: impl FnOnce(&mut Pair) -> Option<T>,
    ) -> Option<T> {
        let mut map = self.channels.lock().expect("shuffle lock");
        let pair = map.entry(key.clone()).or_insert_with(|| {
            let (tx, rx) = bounded(capacity);
            Pair {
                tx: Some(tx),
                slot: Some(rx.credit_slot()),
                rx: Some(rx),
                taken: 0,
            }
        });
        let end = pick(pair)?;
        pair.taken += 1;
        if pair.taken == 2 {
            map.remove(&key);
        }
        Some(end)
    }

    /// The sending end of a channel.
    pub fn sender(&self, key: ChannelKey, capacity: usize) -> ChannelSender {
        self.take(key, capacity, |p| p.tx.take())
    }

    /// The receiving end of a channel.
    pub fn receiver(&self, key: ChannelKey, capacity: usize) -> ChannelReceiver {
        self.take(key, capacity, |p| p.rx.take())
    }

    /// The sending end of a channel whose producer is in another process, with the slot its
    /// credit return attaches to. `None` when the sending end was already taken (a duplicate
    /// open from a confused peer).
    pub fn inbound(&self, key: ChannelKey, capacity: usize) -> Option<(ChannelSender, CreditSlot)> {
        self.try_take(key, capacity, |p| Some((p.tx.take()?, p.slot.clone()?)))
    }

    /// Forgets the channels of a job attempt whose other end will never be taken.
    pub fn release(&self, job: &JobId) {
        self.channels
            .lock()
            .expect("shuffle lock")
            .retain(|k, _| &k.job != job);
    }
}
