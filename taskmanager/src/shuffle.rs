//! Channels between subtasks, looked up by name.
//!
//! A channel is named by (job, attempt, edge, producing subtask, consuming subtask). Whichever
//! side asks first creates it; each side takes its own end once. Within one process both ends are
//! a bounded in-memory channel; a channel from another process is the same, with its sending end
//! held by the [`network`](crate::network) (see [`LocalShuffle::inbound`]). Channels of different
//! attempts never mix, so a restarted job cannot read a previous attempt's data.
//!
//! An attempt is *retired* here when it is cancelled or a newer attempt of its job arrives: its
//! half-taken channels are dropped, and a channel of a retired attempt that a late peer or a late
//! deployment asks for is made on the spot and never stored, so a cluster that restarts jobs
//! many times does not accumulate channels nobody will take.
use parking_lot::Mutex;
use std::collections::HashMap;

use freshet_control::JobId;
use freshet_engine::channel::{ChannelReceiver, ChannelSender, CreditSlot, bounded};

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
    inner: Mutex<Channels>,
}

#[derive(Default)]
struct Channels {
    open: HashMap<ChannelKey, Pair>,
    /// Per job, the newest retired attempt: it and every older one are gone for good.
    retired: HashMap<JobId, u32>,
}

fn new_pair(capacity: usize) -> Pair {
    let (tx, rx) = bounded(capacity);
    Pair {
        tx: Some(tx),
        slot: Some(rx.credit_slot()),
        rx: Some(rx),
        taken: 0,
    }
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
        let mut inner = self.inner.lock();
        if inner
            .retired
            .get(&key.job)
            .is_some_and(|r| key.attempt <= *r)
        {
            // nobody will take the other end: a channel of its own, dropped with its holder
            return pick(&mut new_pair(capacity));
        }
        let pair = inner
            .open
            .entry(key.clone())
            .or_insert_with(|| new_pair(capacity));
        let end = pick(pair)?;
        pair.taken += 1;
        if pair.taken == 2 {
            inner.open.remove(&key);
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

    /// Retires `attempt` of `job` and every older attempt: forgets their channels whose other
    /// end will never be taken, and keeps none of theirs asked for later.
    pub fn retire(&self, job: &JobId, attempt: u32) {
        let mut inner = self.inner.lock();
        let r = inner.retired.entry(job.clone()).or_insert(attempt);
        *r = (*r).max(attempt);
        inner
            .open
            .retain(|k, _| &k.job != job || k.attempt > attempt);
    }

    /// Channels with one end taken and the other still to come.
    pub fn pending(&self) -> usize {
        self.inner.lock().open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use freshet_engine::Element;

    fn key(attempt: u32, to: u32) -> ChannelKey {
        ChannelKey {
            job: JobId("j".into()),
            attempt,
            edge: 0,
            from: 0,
            to,
        }
    }

    #[test]
    fn both_ends_taken_leave_nothing_behind() {
        let s = LocalShuffle::new();
        let tx = s.sender(key(0, 0), 2);
        assert_eq!(s.pending(), 1);
        let rx = s.receiver(key(0, 0), 2);
        assert_eq!(s.pending(), 0);
        tx.send(Element::Idle).unwrap();
        assert!(matches!(
            rx.recv_timeout(std::time::Duration::ZERO),
            Ok(Some(Element::Idle))
        ));
    }

    #[test]
    fn a_retired_attempt_keeps_no_channels() {
        let s = LocalShuffle::new();
        let _half = s.sender(key(1, 0), 2);
        let _newer = s.sender(key(2, 0), 2);
        assert_eq!(s.pending(), 2);
        s.retire(&JobId("j".into()), 1);
        // the newer attempt's channel stays, the retired one's is gone
        assert_eq!(s.pending(), 1);
        // a late peer opening a channel of a retired attempt leaves nothing behind
        assert!(s.inbound(key(1, 3), 2).is_some());
        assert!(s.inbound(key(0, 3), 2).is_some());
        let _late = s.receiver(key(1, 4), 2);
        assert_eq!(s.pending(), 1);
        // retiring an older attempt later does not bring the retired ones back
        s.retire(&JobId("j".into()), 0);
        let _again = s.sender(key(1, 5), 2);
        assert_eq!(s.pending(), 1);
        // the newer attempt still connects
        let _rx = s.receiver(key(2, 0), 2);
        assert_eq!(s.pending(), 0);
    }
}
