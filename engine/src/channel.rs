//! Bounded channels between subtasks in the same process.
//!
//! A channel holds at most `capacity` elements; a sender that finds it full blocks, which is how a
//! slow consumer slows its producers down (backpressure) instead of growing memory. Time spent
//! blocked is added to the sender's `backpressured_ns` metric. A blocked sender wakes up when the
//! job is cancelled, and fails at once when its receiver goes.
//!
//! A sender blocked on a full local channel is woken only once the channel has drained to half
//! its capacity, so a producer faster than its consumer fills several slots per wake-up instead
//! of trading one context switch for every element taken.
//!
//! A channel to a subtask in another process has the same contract: its sending end is an
//! [`Outbound`] that sends only with credit the receiver granted, and its receiving end is an
//! ordinary bounded channel fed by the network, which returns a credit through its
//! [`CreditReturn`] each time the consuming subtask takes an element.
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
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
    let capacity = capacity.max(1);
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let refill = Arc::new(Refill {
        low: capacity / 2,
        waiting: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        parked: Mutex::new(Vec::new()),
    });
    (
        ChannelSender::with(Outlet::Local(tx, refill.clone())),
        ChannelReceiver {
            rx,
            credits: Arc::new(OnceLock::new()),
            refill,
        },
    )
}

/// Senders parked on a full local channel, and the fill level at which they are woken.
#[derive(Debug)]
struct Refill {
    /// Woken once at most this many elements wait.
    low: usize,
    /// Number of parked senders (read by the receiver after each take).
    waiting: AtomicUsize,
    /// The receiver is gone.
    closed: AtomicBool,
    parked: Mutex<Vec<Thread>>,
}

impl Refill {
    /// Parks the calling sender until the receiver has drained `rx` to the low mark (or for at
    /// most `timeout`).
    fn park(&self, tx: &Sender<Element>, timeout: Duration) {
        let me = std::thread::current();
        self.parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(me.clone());
        self.waiting.fetch_add(1, Ordering::SeqCst);
        // pairs with the fence in `wake`: either the receiver sees this sender waiting or this
        // sender sees the channel drained
        fence(Ordering::SeqCst);
        if tx.len() > self.low && !self.closed.load(Ordering::SeqCst) {
            std::thread::park_timeout(timeout);
        }
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = parked.iter().position(|t| t.id() == me.id()) {
            parked.swap_remove(i);
        }
    }

    /// Called by the receiver after each take: wakes the parked senders once the channel is down
    /// to the low mark.
    fn wake(&self, rx: &Receiver<Element>) {
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) == 0 || rx.len() > self.low {
            return;
        }
        self.unpark_all();
    }

    /// Called when the receiver goes: parked senders wake and fail at once.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.unpark_all();
    }

    fn unpark_all(&self) {
        for t in self
            .parked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.unpark();
        }
    }
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
    Local(Sender<Element>, Arc<Refill>),
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

    /// Whether the receiver is in this process (elements are handed over, not encoded).
    pub fn is_local(&self) -> bool {
        matches!(self.outlet, Outlet::Local(..))
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
            Outlet::Local(tx, refill) => {
                let mut deadline = None;
                let mut e = e;
                loop {
                    match tx.try_send(e) {
                        Ok(()) => return Ok(None),
                        Err(TrySendError::Disconnected(_)) => {
                            return Err(EngineError::ChannelClosed);
                        }
                        Err(TrySendError::Full(back)) => e = back,
                    }
                    if refill.closed.load(Ordering::SeqCst) {
                        return Err(EngineError::ChannelClosed);
                    }
                    let now = Instant::now();
                    let until = *deadline.get_or_insert(now + timeout);
                    if now >= until {
                        return Ok(Some(e));
                    }
                    refill.park(tx, until - now);
                }
            }
        }
    }
}

/// The receiving end of a channel.
#[derive(Debug)]
pub struct ChannelReceiver {
    pub(crate) rx: Receiver<Element>,
    credits: Arc<OnceLock<Arc<dyn CreditReturn>>>,
    refill: Arc<Refill>,
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

impl Drop for ChannelReceiver {
    fn drop(&mut self) {
        self.refill.close();
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
        self.refill.wake(&self.rx);
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
    fn a_blocked_sender_is_woken_once_the_channel_is_down_to_half() {
        let (tx, rx) = bounded(8);
        for i in 0..8 {
            tx.send(Element::Watermark(crate::Watermark(i))).unwrap();
        }
        let Outlet::Local(raw, refill) = tx.outlet.clone() else {
            unreachable!("a local channel")
        };
        let woken = Arc::new(AtomicBool::new(false));
        let w = woken.clone();
        let parked = std::thread::spawn(move || {
            refill.park(&raw, Duration::from_secs(10));
            w.store(true, Ordering::SeqCst);
        });
        let take = || {
            rx.recv_timeout(Duration::from_secs(1)).unwrap().unwrap();
        };
        // one slot free: the sender stays parked
        std::thread::sleep(Duration::from_millis(50));
        take();
        std::thread::sleep(Duration::from_millis(200));
        assert!(!woken.load(Ordering::SeqCst), "woken with 7 of 8 waiting");
        // down to 4 of 8: woken
        for _ in 0..3 {
            take();
        }
        let start = Instant::now();
        while !woken.load(Ordering::SeqCst) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "not woken at half"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        parked.join().unwrap();
        // and the sender then fills the channel again without blocking
        for i in 0..4 {
            assert!(
                tx.offer(Element::Watermark(crate::Watermark(i)))
                    .unwrap()
                    .is_none()
            );
        }
    }

    #[test]
    fn a_blocked_sender_fails_as_soon_as_the_receiver_goes() {
        let (tx, rx) = bounded(2);
        tx.send(Element::Idle).unwrap();
        tx.send(Element::Idle).unwrap();
        let dropper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(rx);
        });
        let start = Instant::now();
        assert!(matches!(
            tx.try_send(Element::Idle, Duration::from_secs(20)),
            Err(EngineError::ChannelClosed)
        ));
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the sender waited out its timeout"
        );
        dropper.join().unwrap();
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
