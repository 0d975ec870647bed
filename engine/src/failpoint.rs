//! Failpoints: named places where a test can make the process die, to prove recovery from a
//! crash at a precise moment (after a checkpoint completed and before a sink's commit reached
//! its destination, say), which random kills hit only by luck.
//!
//! `FRESHET_FAILPOINTS=name@n[,name@n...]` makes the `n`-th pass of `name` in this process
//! fail: at a [`hit`] the process aborts on the spot (no unwinding, no cleanup: like SIGKILL);
//! at a [`fails`] the caller takes the error path it would take for a real failure of what it
//! is about to do (a thread that cannot be started, say), which nothing else can provoke on
//! demand. Without the variable a pass costs one relaxed atomic load.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// Per armed failpoint: the hit that aborts, and the hits so far.
type Points = Mutex<HashMap<String, (u64, u64)>>;

static ARMED: OnceLock<Option<Points>> = OnceLock::new();
static ANY: AtomicBool = AtomicBool::new(true);

fn armed() -> &'static Option<Points> {
    ARMED.get_or_init(|| {
        let spec = std::env::var("FRESHET_FAILPOINTS").ok()?;
        let points: HashMap<String, (u64, u64)> = spec
            .split(',')
            .filter_map(|p| {
                let (name, n) = p.trim().split_once('@')?;
                Some((name.to_string(), (n.parse().ok()?, 0)))
            })
            .collect();
        if points.is_empty() {
            ANY.store(false, Ordering::Relaxed);
            return None;
        }
        Some(Mutex::new(points))
    })
}

/// Counts a pass of failpoint `name`: `Some(n)` if it is the `n`-th, the pass the failpoint is
/// armed for.
fn pass(name: &str) -> Option<u64> {
    if !ANY.load(Ordering::Relaxed) {
        return None;
    }
    let Some(points) = armed() else {
        ANY.store(false, Ordering::Relaxed);
        return None;
    };
    let mut points = points.lock().unwrap_or_else(|p| p.into_inner());
    let (at, seen) = points.get_mut(name)?;
    *seen += 1;
    (*seen == *at).then_some(*at)
}

/// Passes failpoint `name`: aborts the process if this is the pass it is armed for.
pub fn hit(name: &str) {
    if let Some(at) = pass(name) {
        eprintln!("failpoint {name}@{at}: aborting the process");
        std::process::abort();
    }
}

/// Passes failpoint `name`: whether the caller must fail here, as it would if what it is about
/// to do failed (this is the pass the failpoint is armed for).
pub fn fails(name: &str) -> bool {
    let at = pass(name);
    if let Some(at) = at {
        eprintln!("failpoint {name}@{at}: failing here");
    }
    at.is_some()
}
