//! Bounded channels between subtasks in the same process.
//!
//! A channel holds at most `capacity` elements; a sender that finds it full blocks, which is how a
//! slow consumer slows its producers down (backpressure) instead of growing memory. Time spent
//! blocked is added to the sender's `backpressured_ns` metric. A blocked sender wakes up when the
//! job is cancelled.
//!
//! A channel to a subtask in another process has the same contract: its sending end is an
//! [`Outbound`] that sends only with credit the receiver granted, and its receiving end is an
//! ordinary bounded channel fed by the network, which returns a credit through its
//! [`CreditReturn`] each time the consuming subtask takes an element.
use crossbeam_channel::{Receiver, SendTimeoutError, Sender, TrySendError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
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
        ChannelSender::with(Outlet::Local(tx)),
        ChannelReceiver {
            rx,
            credits: Arc::new(OnceLock::new()),
        },
    )
}

/// The sending end of a channel to another process: sends only with credit.
pub trait Outbound: Send + Sync + std::fmt::Debug {
    /// Sends `e` if credit is available within `timeout`; gives it back otherwise. Fails with
    /// [`EngineError::ChannelClosed`] once the connection to the receiver is gone.
    fn send_timeout(&self, e: Element, timeout: Duration) -> Result<Option<Element>>;
}

/// Told each time the consuming subtask takes an element from a channel fed by the network, so
/// the element's buffer can be granted to the sender again.
pub trait CreditReturn: Send + Sync + std::fmt::Debug {
    /// One element was taken.
    fn taken(&self);
}

#[derive(Debug, Clone)]
enum Outlet {
    Local(Sender<Element>),
    Remote(Arc<dyn Outbound>),
}

/// The sending end of a channel.
#[derive(Debug, Clone)]
pub struct ChannelSender {
    outlet: Outlet,
    cancel: Option<CancelToken>,
    metrics: Option<Arc<SubtaskMetrics>>,
}

impl ChannelSender {
    fn with(outlet: Outlet) -> Self {
        ChannelSender {
            outlet,
            cancel: None,
            metrics: None,
        }
    }

    /// A sender to a subtask in another process.
    pub fn remote(outbound: Arc<dyn Outbound>) -> Self {
        Self::with(Outlet::Remote(outbound))
    }

    /// Binds the sender to the sending subtask's cancel token and metrics.
    pub fn bind(&mut self, cancel: CancelToken, metrics: Arc<SubtaskMetrics>) {
        self.cancel = Some(cancel);
        self.metrics = Some(metrics);
    }

    /// Sends an element, blocking while the channel is full.
    pub fn send(&self, e: Element) -> Result<()> {
        let e = match self.try_send(e, Duration::ZERO)? {
            None => return Ok(()),
            Some(e) => e,
        };
        let start = Instant::now();
        let mut e = e;
        let result = loop {
            match self.try_send(e, Duration::from_millis(50)) {
                Ok(None) => break Ok(()),
                Err(err) => break Err(err),
                Ok(Some(back)) => {
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

    /// Sends only if there is room now; gives the element back otherwise.
    pub fn offer(&self, e: Element) -> Result<Option<Element>> {
        self.try_send(e, Duration::ZERO)
    }

    /// Sends within `timeout` (zero: only if there is room now); gives the element back when
    /// there was no room.
    fn try_send(&self, e: Element, timeout: Duration) -> Result<Option<Element>> {
        match &self.outlet {
            Outlet::Remote(out) => out.send_timeout(e, timeout),
            Outlet::Local(tx) if timeout.is_zero() => match tx.try_send(e) {
                Ok(()) => Ok(None),
                Err(TrySendError::Disconnected(_)) => Err(EngineError::ChannelClosed),
                Err(TrySendError::Full(e)) => Ok(Some(e)),
            },
            Outlet::Local(tx) => match tx.send_timeout(e, timeout) {
                Ok(()) => Ok(None),
                Err(SendTimeoutError::Disconnected(_)) => Err(EngineError::ChannelClosed),
                Err(SendTimeoutError::Timeout(e)) => Ok(Some(e)),
            },
        }
    }
}

/// The receiving end of a channel.
#[derive(Debug)]
pub struct ChannelReceiver {
    pub(crate) rx: Receiver<Element>,
    credits: Arc<OnceLock<Arc<dyn CreditReturn>>>,
}

/// Where the network attaches its [`CreditReturn`] to a receiver that may already be taken.
#[derive(Debug, Clone)]
pub struct CreditSlot(Arc<OnceLock<Arc<dyn CreditReturn>>>);

impl CreditSlot {
    /// Attaches the credit return (once).
    pub fn attach(&self, credits: Arc<dyn CreditReturn>) {
        let _ = self.0.set(credits);
    }
}

impl ChannelReceiver {
    /// Where a network feeding this channel attaches its credit return.
    pub fn credit_slot(&self) -> CreditSlot {
        CreditSlot(self.credits.clone())
    }

    /// Elements waiting to be taken.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether no element is waiting.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Called after an element was taken from `rx` directly (in a select).
    pub(crate) fn taken(&self) {
        if let Some(c) = self.credits.get() {
            c.taken();
        }
    }

    /// Receives the next element, waiting at most `timeout`: `None` on timeout, an error if the
    /// sender went away without sending end-of-input (it failed or was cancelled).
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Element>> {
        match self.rx.recv_timeout(timeout) {
            Ok(e) => {
                self.taken();
                Ok(Some(e))
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Ok(None),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                Err(EngineError::UpstreamClosed)
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
