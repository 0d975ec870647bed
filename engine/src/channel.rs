//! Bounded channels between subtasks in the same process.
//!
//! A channel holds at most `capacity` elements; a sender that finds it full blocks, which is how a
//! slow consumer slows its producers down (backpressure) instead of growing memory. Time spent
//! blocked is added to the sender's `backpressured_ns` metric. A blocked sender wakes up when the
//! job is cancelled. Channels to subtasks in other processes will implement the same contract with
//! credit-based flow control.
use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::SubtaskMetrics;
use crate::{Element, EngineError, Result};

/// Shared cancellation flag of one job attempt.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A fresh, not-cancelled token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests cancellation of everything holding this token.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Creates a bounded channel of `capacity` elements.
pub fn bounded(capacity: usize) -> (ChannelSender, ChannelReceiver) {
    let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
    (
        ChannelSender {
            tx,
            cancel: None,
            metrics: None,
        },
        ChannelReceiver { rx },
    )
}

/// The sending end of a channel.
#[derive(Debug, Clone)]
pub struct ChannelSender {
    tx: Sender<Element>,
    cancel: Option<CancelToken>,
    metrics: Option<Arc<SubtaskMetrics>>,
}

impl ChannelSender {
    /// Binds the sender to the sending subtask's cancel token and metrics.
    pub fn bind(&mut self, cancel: CancelToken, metrics: Arc<SubtaskMetrics>) {
        self.cancel = Some(cancel);
        self.metrics = Some(metrics);
    }

    /// Sends an element, blocking while the channel is full.
    pub fn send(&self, e: Element) -> Result<()> {
        let e = match self.tx.try_send(e) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Disconnected(_)) => return Err(EngineError::ChannelClosed),
            Err(TrySendError::Full(e)) => e,
        };
        let start = Instant::now();
        let mut e = e;
        let result = loop {
            match self.tx.send_timeout(e, Duration::from_millis(50)) {
                Ok(()) => break Ok(()),
                Err(SendTimeoutError::Disconnected(_)) => break Err(EngineError::ChannelClosed),
                Err(SendTimeoutError::Timeout(back)) => {
                    if self.cancel.as_ref().is_some_and(CancelToken::is_cancelled) {
                        break Err(EngineError::Cancelled);
                    }
                    e = back;
                }
            }
        };
        if let Some(m) = &self.metrics {
            SubtaskMetrics::add(&m.backpressured_ns, start.elapsed().as_nanos() as u64);
        }
        result
    }
}

/// The receiving end of a channel.
#[derive(Debug)]
pub struct ChannelReceiver {
    pub(crate) rx: Receiver<Element>,
}

impl ChannelReceiver {
    /// Receives the next element, waiting at most `timeout`: `None` on timeout, an error if the
    /// sender went away without sending end-of-input (it failed or was cancelled).
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Element>> {
        match self.rx.recv_timeout(timeout) {
            Ok(e) => Ok(Some(e)),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(None),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                Err(EngineError::ChannelClosed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_channel_blocks_the_sender_and_counts_the_time() {
        let (mut tx, rx) = bounded(1);
        let metrics = Arc::new(SubtaskMetrics::default());
        tx.bind(CancelToken::new(), metrics.clone());
        let consumer = std::thread::spawn(move || {
            let mut got = 0;
            while got < 4 {
                std::thread::sleep(Duration::from_millis(30));
                if let Some(Element::Watermark(_)) =
                    rx.recv_timeout(Duration::from_secs(5)).unwrap()
                {
                    got += 1;
                }
            }
        });
        let start = Instant::now();
        for i in 0..4 {
            tx.send(Element::Watermark(crate::Watermark(i))).unwrap();
        }
        // the sender could only run ahead by the channel's capacity
        assert!(
            start.elapsed() >= Duration::from_millis(60),
            "sends did not wait for the consumer"
        );
        assert!(
            metrics.snapshot().backpressured_ns >= 50_000_000,
            "{:?}",
            metrics.snapshot()
        );
        consumer.join().unwrap();
    }

    #[test]
    fn cancellation_wakes_a_blocked_sender() {
        let (mut tx, _rx) = bounded(1);
        let cancel = CancelToken::new();
        tx.bind(cancel.clone(), Arc::new(SubtaskMetrics::default()));
        tx.send(Element::Idle).unwrap();
        let c = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            c.cancel();
        });
        assert!(matches!(
            tx.send(Element::Idle),
            Err(EngineError::Cancelled)
        ));
    }
}
