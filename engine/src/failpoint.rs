//! Failpoints: named places where a test can make the process die, to prove recovery from a
//! crash at a precise moment (after a checkpoint completed and before a sink's commit reached
//! its destination, say), which random kills hit only by luck.
//!
//! `FRESHET_FAILPOINTS=name@n[,name@n...]` makes the `n`-th [`hit`] of `name` in this process
//! abort it on the spot (no unwinding, no cleanup: like SIGKILL). Without the variable a hit
//! costs one relaxed atomic load.
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

/// Passes failpoint `name`: aborts the process if this is the hit it is armed for.
pub fn hit(name: &str) {
    if !ANY.load(Ordering::Relaxed) {
        return;
    }
    let Some(points) = armed() else {
        ANY.store(false, Ordering::Relaxed);
        return;
    };
    let mut points = points.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((at, seen)) = points.get_mut(name) {
        *seen += 1;
        if *seen == *at {
            eprintln!("failpoint {name}@{at}: aborting the process");
            std::process::abort();
        }
    }
}
