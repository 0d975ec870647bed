//! The process's own metrics: CPU time and resident memory, read when collected.
use opentelemetry::metrics::Meter;

/// Registers `process.cpu.time` and `process.memory.usage` on `meter`.
pub(crate) fn register(meter: &Meter) {
    meter
        .f64_observable_counter("process.cpu.time")
        .with_unit("s")
        .with_description("CPU time the process used, user and system")
        .with_callback(|o| {
            if let Some(s) = cpu_seconds() {
                o.observe(s, &[]);
            }
        })
        .build();
    meter
        .u64_observable_gauge("process.memory.usage")
        .with_unit("By")
        .with_description("Resident memory of the process")
        .with_callback(|o| {
            if let Some(b) = resident_bytes() {
                o.observe(b, &[]);
            }
        })
        .build();
}

fn cpu_seconds() -> Option<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is given and nothing else
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: getrusage succeeded, so it filled the struct
    let u = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(u.ru_utime) + secs(u.ru_stime))
}

fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(4096) as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_and_memory_are_read() {
        let before = super::cpu_seconds().unwrap();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(super::cpu_seconds().unwrap() > before);
        assert!(super::resident_bytes().unwrap() > 1 << 20);
    }
}
