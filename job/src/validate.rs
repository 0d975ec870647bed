//! Structural checks of a job: names, references, the graph, parallelism. Every problem is
//! reported, not just the first. Expression and type checks happen at planning time.
use std::collections::{HashMap, HashSet};

use crate::{
    JOB_FORMAT_VERSION, JobSpec, Problem, Problems, RestartSpec, TransformSpec, WindowSpec,
};

/// Side outputs each kind of node has, by name, with their port numbers.
pub fn side_outputs_of_source() -> &'static [(&'static str, usize)] {
    &[("dead_letter", 1)]
}

/// Side outputs of a transform kind.
pub fn side_outputs_of(t: &TransformSpec) -> &'static [(&'static str, usize)] {
    match t {
        TransformSpec::Window(_) => &[("late", 1)],
        TransformSpec::IntervalJoin(_) => &[("unmatched", 1), ("late", 2)],
        TransformSpec::Deduplicate(_) | TransformSpec::Pattern(_) => &[("late", 1)],
        TransformSpec::Filter { .. }
        | TransformSpec::Project { .. }
        | TransformSpec::KeyBy { .. }
        | TransformSpec::Rebalance { .. }
        | TransformSpec::Broadcast { .. } => &[],
    }
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && n.chars().next().is_some_and(|c| c.is_ascii_lowercase())
}

/// Validates the job's structure.
pub fn validate(job: &JobSpec) -> Result<(), Problems> {
    let mut p = Problems::default();
    if job.version != JOB_FORMAT_VERSION {
        p.push(
            Problem::new(
                "version",
                format!("unsupported job format version {}", job.version),
            )
            .hint("use version: 1"),
        );
    }
    if !valid_name(&job.name) {
        p.push(
            Problem::new("name", format!("'{}' is not a valid job name", job.name))
                .hint("use lowercase letters, digits, '-' and '_', starting with a letter"),
        );
    }
    if job.parallelism == 0 {
        p.push(Problem::new("parallelism", "must be at least 1"));
    }
    if job.max_parallelism == 0 || job.max_parallelism > 32_768 {
        p.push(
            Problem::new(
                "max_parallelism",
                format!("{} is out of range", job.max_parallelism),
            )
            .hint("use a value between 1 and 32768, e.g. 128"),
        );
    }
    if let Some(c) = &job.checkpointing {
        if c.interval.0 < std::time::Duration::from_millis(10) {
            p.push(Problem::new(
                "checkpointing.interval",
                "must be at least 10ms",
            ));
        }
        if c.timeout.0.is_zero() {
            p.push(Problem::new("checkpointing.timeout", "must be more than 0"));
        }
        if c.max_concurrent == 0 {
            p.push(Problem::new(
                "checkpointing.max_concurrent",
                "must be at least 1",
            ));
        }
        if c.retain == 0 {
            p.push(Problem::new("checkpointing.retain", "must be at least 1"));
        }
        if c.dir.trim().is_empty() {
            p.push(Problem::new("checkpointing.dir", "must not be empty"));
        }
    }
    match &job.restart {
        Some(RestartSpec::ExponentialBackoff {
            multiplier,
            initial_delay,
            max_delay,
            ..
        }) => {
            if !(multiplier.is_finite() && *multiplier >= 1.0) {
                p.push(
                    Problem::new(
                        "restart.multiplier",
                        format!("{multiplier} is not a growth"),
                    )
                    .hint("use a number of at least 1, e.g. 2"),
                );
            }
            if max_delay.0 < initial_delay.0 {
                p.push(Problem::new(
                    "restart.max_delay",
                    "must not be shorter than restart.initial_delay",
                ));
            }
        }
        Some(RestartSpec::FailureRate { interval, .. }) if interval.0.is_zero() => {
            p.push(Problem::new("restart.interval", "must be more than 0"));
        }
        _ => {}
    }
    if job.state.cache_keys == Some(0) {
        p.push(Problem::new("state.cache_keys", "must be at least 1"));
    }
    if job.state.memory_mb < 16 {
        p.push(Problem::new(
            "state.memory_mb",
            format!(
                "{} MiB is too little; keyed state needs at least 16",
                job.state.memory_mb
            ),
        ));
    }
    match job.state.write_buffer_mb {
        Some(0) => p.push(Problem::new("state.write_buffer_mb", "must be at least 1")),
        Some(mb) if mb > job.state.memory_mb / 8 => p.push(Problem::new(
            "state.write_buffer_mb",
            format!(
                "{mb} MiB is more than the memtables' share of state.memory_mb (an eighth, {} MiB)",
                job.state.memory_mb / 8
            ),
        )),
        _ => {}
    }
    if job.pipeline.batch_size == 0 {
        p.push(Problem::new("pipeline.batch_size", "must be at least 1"));
    }
    if job.sources.is_empty() {
        p.push(Problem::new("sources", "a job needs at least one source"));
    }
    if job.sinks.is_empty() {
        p.push(
            Problem::new("sinks", "a job needs at least one sink")
                .hint("add a sink such as {input: <stream>, connector: {type: stdout}}"),
        );
    }

    // Streams: name -> side outputs.
    let mut streams: HashMap<&str, Vec<&str>> = HashMap::new();
    for name in job.sources.keys() {
        if !valid_name(name) {
            p.push(
                Problem::new(format!("sources.{name}"), "invalid name")
                    .hint("use lowercase letters, digits, '-' and '_'"),
            );
        }
        streams.insert(name, side_outputs_of_source().iter().map(|s| s.0).collect());
    }
    for (name, t) in &job.transforms {
        if !valid_name(name) {
            p.push(
                Problem::new(format!("transforms.{name}"), "invalid name")
                    .hint("use lowercase letters, digits, '-' and '_'"),
            );
        }
        if streams.contains_key(name.as_str()) {
            p.push(
                Problem::new(
                    format!("transforms.{name}"),
                    "a source already has this name",
                )
                .hint("source and transform names must be distinct"),
            );
        }
        streams.insert(name, side_outputs_of(t).iter().map(|s| s.0).collect());
    }
    let check_par = |p: &mut Problems, path: String, par: Option<u32>| {
        if let Some(n) = par {
            if n == 0 {
                p.push(Problem::new(path, "must be at least 1"));
            } else if n > job.max_parallelism {
                p.push(
                    Problem::new(
                        path,
                        format!("{n} exceeds max_parallelism {}", job.max_parallelism),
                    )
                    .hint("raise max_parallelism or lower the parallelism"),
                );
            }
        }
    };
    let check_ref = |p: &mut Problems, path: String, r: &str| {
        let (base, port) = match r.split_once('.') {
            Some((b, port)) => (b, Some(port)),
            None => (r, None),
        };
        match streams.get(base) {
            None => {
                let mut known: Vec<&str> = streams.keys().copied().collect();
                known.sort_unstable();
                p.push(
                    Problem::new(path, format!("unknown stream '{base}'"))
                        .hint(format!("use one of: {}", known.join(", "))),
                );
            }
            Some(sides) => {
                if let Some(port) = port
                    && !sides.contains(&port)
                {
                    let hint = if sides.is_empty() {
                        format!("'{base}' has no side outputs")
                    } else {
                        format!("'{base}' has: {}", sides.join(", "))
                    };
                    p.push(
                        Problem::new(path, format!("'{base}' has no side output '{port}'"))
                            .hint(hint),
                    );
                }
            }
        }
    };
    for (name, s) in &job.sources {
        check_par(&mut p, format!("sources.{name}.parallelism"), s.parallelism);
        if let Some(a) = &s.watermark.alignment {
            let base = format!("sources.{name}.watermark.alignment");
            if a.group.trim().is_empty() {
                p.push(Problem::new(format!("{base}.group"), "must not be empty"));
            }
            if a.max_drift.millis() == 0 {
                p.push(
                    Problem::new(format!("{base}.max_drift"), "must be positive").hint(
                        "e.g. 30s: a source pauses once 30 s of event time ahead of its group",
                    ),
                );
            }
        }
    }
    for (name, t) in &job.transforms {
        for (field, input) in t.inputs() {
            check_ref(&mut p, format!("transforms.{name}.{field}"), input);
        }
        check_par(
            &mut p,
            format!("transforms.{name}.parallelism"),
            t.parallelism(),
        );
        match t {
            TransformSpec::Window(w) => {
                let base = format!("transforms.{name}.window");
                match &w.window {
                    WindowSpec::Tumbling { size } if size.millis() == 0 => {
                        p.push(Problem::new(format!("{base}.size"), "must be positive"))
                    }
                    WindowSpec::Sliding { size, slide } => {
                        if slide.millis() == 0 || size.millis() == 0 {
                            p.push(Problem::new(
                                base.clone(),
                                "size and slide must be positive",
                            ));
                        } else if size.millis() % slide.millis() != 0 {
                            p.push(
                                Problem::new(
                                    format!("{base}.slide"),
                                    "size must be a multiple of slide",
                                )
                                .hint("e.g. size 60m with slide 5m"),
                            );
                        }
                    }
                    WindowSpec::Session { gap } if gap.millis() == 0 => {
                        p.push(Problem::new(format!("{base}.gap"), "must be positive"))
                    }
                    _ => {}
                }
                if w.aggregates.is_empty() {
                    p.push(
                        Problem::new(
                            format!("transforms.{name}.aggregates"),
                            "a window needs at least one aggregate",
                        )
                        .hint("e.g. aggregates: [\"count(*) AS n\"]"),
                    );
                }
                if w.key_by.is_empty() && w.parallelism.is_some_and(|n| n > 1) {
                    p.push(
                        Problem::new(
                            format!("transforms.{name}.parallelism"),
                            "a window without key_by is global and runs at parallelism 1",
                        )
                        .hint("remove parallelism or add key_by"),
                    );
                }
            }
            TransformSpec::Deduplicate(d) => {
                if d.key.is_empty() {
                    p.push(Problem::new(
                        format!("transforms.{name}.key"),
                        "needs at least one key column",
                    ));
                }
                if d.keep == crate::DedupKeep::Latest && d.order_by.is_none() {
                    p.push(
                        Problem::new(
                            format!("transforms.{name}.order_by"),
                            "keep: latest needs order_by",
                        )
                        .hint("e.g. order_by: lsn"),
                    );
                }
            }
            TransformSpec::IntervalJoin(j) => {
                if j.left_key.is_empty() || j.left_key.len() != j.right_key.len() {
                    p.push(Problem::new(
                        format!("transforms.{name}.right_key"),
                        "left_key and right_key must be non-empty and of the same length",
                    ));
                }
                if j.lower_bound > j.upper_bound {
                    p.push(Problem::new(
                        format!("transforms.{name}.lower_bound"),
                        "lower_bound is after upper_bound",
                    ));
                }
                if j.left.split('.').next() == j.right.split('.').next() {
                    p.push(
                        Problem::new(
                            format!("transforms.{name}.right"),
                            "a stream cannot be joined with itself here",
                        )
                        .hint("project it under another name first"),
                    );
                }
            }
            TransformSpec::Pattern(pt) => {
                if pt.count == 0 {
                    p.push(Problem::new(
                        format!("transforms.{name}.count"),
                        "must be at least 1",
                    ));
                }
                if pt.key_by.is_empty() {
                    p.push(Problem::new(
                        format!("transforms.{name}.key_by"),
                        "needs at least one key column",
                    ));
                }
            }
            TransformSpec::KeyBy { key, .. } if key.is_empty() => {
                p.push(Problem::new(
                    format!("transforms.{name}.key"),
                    "needs at least one key column",
                ));
            }
            _ => {}
        }
    }
    for (name, s) in &job.sinks {
        check_ref(&mut p, format!("sinks.{name}.input"), &s.input);
        check_par(&mut p, format!("sinks.{name}.parallelism"), s.parallelism);
    }
    // Cycles among transforms.
    let mut state: HashMap<&str, u8> = HashMap::new();
    fn visit<'a>(
        job: &'a JobSpec,
        n: &'a str,
        state: &mut HashMap<&'a str, u8>,
        p: &mut Problems,
        seen: &mut HashSet<&'a str>,
    ) {
        match state.get(n) {
            Some(2) => return,
            Some(1) => {
                if seen.insert(n) {
                    p.push(
                        Problem::new(format!("transforms.{n}"), "is part of a cycle")
                            .hint("a transform cannot read, directly or not, its own output"),
                    );
                }
                return;
            }
            _ => {}
        }
        state.insert(n, 1);
        if let Some(t) = job.transforms.get(n) {
            for (_, input) in t.inputs() {
                let base = input.split('.').next().unwrap_or(input);
                if job.transforms.contains_key(base) {
                    visit(job, base, state, p, seen);
                }
            }
        }
        state.insert(n, 2);
    }
    let mut seen = HashSet::new();
    for n in job.transforms.keys() {
        visit(job, n, &mut state, &mut p, &mut seen);
    }
    p.into_result()
}

#[cfg(test)]
mod tests {
    use crate::parse_job;

    #[test]
    fn lists_every_problem() {
        let job = r#"
version: 2
name: Bad Name
sources:
  s:
    connector: {type: file, path: x, format: csv}
transforms:
  w:
    type: window
    input: nope
    window: {type: sliding, size: 10m, slide: 3m}
    aggregates: []
  a: {type: filter, input: b, where: "true"}
  b: {type: filter, input: a, where: "true"}
sinks:
  o: {input: w.early, connector: {type: stdout}}
"#;
        let err = parse_job(job, "job.yaml", &[]).unwrap_err().to_string();
        for needle in [
            "version",
            "name",
            "transforms.w.input: unknown stream 'nope'",
            "transforms.w.window.slide",
            "transforms.w.aggregates",
            "is part of a cycle",
            "no side output 'early'",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
        }
    }

    /// A generator into a blackhole, with `setting` (a top-level line of the job) added.
    fn generator_job(setting: &str) -> String {
        format!(
            "version: 1\nname: g\n{setting}\nsources:\n  s: {{connector: {{type: generator, fields: {{a: seq}}}}}}\nsinks:\n  o: {{input: s, connector: {{type: blackhole}}}}\n"
        )
    }

    /// A watermark alignment group needs a name and a positive drift; a valid one reaches the
    /// source's watermark settings.
    #[test]
    fn an_alignment_group_needs_a_name_and_a_drift() {
        let job = |alignment: &str| {
            format!(
                "version: 1\nname: g\nsources:\n  s:\n    connector: {{type: generator, fields: {{a: seq}}}}\n    watermark: {{alignment: {alignment}}}\nsinks:\n  o: {{input: s, connector: {{type: blackhole}}}}\n"
            )
        };
        let spec = parse_job(&job("{group: g, max_drift: 30s}"), "job.yaml", &[]).unwrap();
        let a = spec.sources["s"].watermark.alignment.as_ref().unwrap();
        assert_eq!((a.group.as_str(), a.max_drift.millis()), ("g", 30_000));
        let err = parse_job(&job("{group: \" \", max_drift: 0s}"), "job.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sources.s.watermark.alignment.group: must not be empty"),
            "{err}"
        );
        assert!(
            err.contains("sources.s.watermark.alignment.max_drift: must be positive"),
            "{err}"
        );
        let err = parse_job(&job("{group: g}"), "job.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_drift"), "{err}");
    }

    /// A memtable size left unset fits any memory a job may have; one set is held to its
    /// share.
    #[test]
    fn the_memtable_size_fits_the_state_memory_unless_set() {
        let job = |state: &str| generator_job(&format!("state: {state}"));
        let mb = |state: &str| {
            parse_job(&job(state), "job.yaml", &[])
                .unwrap()
                .state
                .write_buffer_mb()
        };
        assert_eq!(mb("{}"), 16);
        assert_eq!(mb("{memory_mb: 1024}"), 16);
        assert_eq!(mb("{memory_mb: 64}"), 8);
        assert_eq!(mb("{memory_mb: 16}"), 2);
        assert_eq!(mb("{memory_mb: 32, write_buffer_mb: 2}"), 2);
        let err = parse_job(&job("{memory_mb: 32, write_buffer_mb: 8}"), "job.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("state.write_buffer_mb: 8 MiB"), "{err}");
        let err = parse_job(&job("{write_buffer_mb: 0}"), "job.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("state.write_buffer_mb: must be at least 1"),
            "{err}"
        );
    }

    #[test]
    fn refuses_restart_settings_that_make_no_sense() {
        let job = |restart: &str| generator_job(&format!("restart: {restart}"));
        let err = |restart: &str| {
            parse_job(&job(restart), "job.yaml", &[])
                .unwrap_err()
                .to_string()
        };
        assert!(
            err("{strategy: exponential-backoff, attempts: 3, multiplier: 0.5}")
                .contains("restart.multiplier")
        );
        assert!(
            err("{strategy: exponential-backoff, attempts: 3, initial_delay: 2m, max_delay: 1m}")
                .contains("restart.max_delay")
        );
        assert!(
            err("{strategy: failure-rate, max_failures: 3, interval: 0s}")
                .contains("restart.interval")
        );
        parse_job(
            &job("{strategy: failure-rate, max_failures: 3, interval: 5m, delay: 2s}"),
            "job.yaml",
            &[],
        )
        .unwrap();
    }
}
