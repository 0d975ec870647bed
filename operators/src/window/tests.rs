use super::*;
use crate::testing::{Harness, batch, schema, selections};
use arrow::array::StringArray;
use freshet_engine::KeyGroupRange;
use std::collections::BTreeMap;

const MIN: i64 = 60_000;

fn harness(kind: WindowKind, lateness: i64, aggs: &[&str]) -> (Harness<WindowOperator>, SchemaRef) {
    let s = schema(vec![
        Field::new("k", DataType::Utf8, true),
        Field::new("u", DataType::Utf8, true),
    ]);
    let aggs: Vec<String> = aggs.iter().map(|a| a.to_string()).collect();
    let plan = WindowPlan::compile(&s, &["k".into()], kind, lateness, &aggs, None).unwrap();
    (Harness::new(plan.instantiate()), s)
}

fn rows(s: &SchemaRef, rows: &[(&str, &str, i64)]) -> RecordBatch {
    batch(
        s,
        vec![
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
        ],
        &rows.iter().map(|r| r.2).collect::<Vec<_>>(),
    )
}

/// A xorshift generator: the same numbers for the same seed.
fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// The last row emitted for each (key, window) (rows are upserts), and how many records went
/// to the late output.
#[derive(Default)]
struct Upserts {
    last: BTreeMap<String, String>,
    late: usize,
}

impl Upserts {
    /// Takes what the operator emitted.
    fn collect(&mut self, h: &mut Harness<WindowOperator>) {
        for line in h.take(0) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let id = format!("{}/{}/{}", v["k"], v["window_start"], v["window_end"]);
            self.last.insert(id, line);
        }
        self.late += h.take(1).len();
    }
}

#[test]
fn tumbling_fires_at_end_minus_one_and_record_at_end_starts_next_window() {
    let (mut h, s) = harness(
        WindowKind::Sliced {
            size: 5 * MIN,
            slide: 5 * MIN,
        },
        0,
        &["count(*) AS n"],
    );
    h.push(
        0,
        rows(
            &s,
            &[("a", "x", 0), ("a", "y", 5 * MIN - 1), ("a", "z", 5 * MIN)],
        ),
    );
    h.watermark(5 * MIN - 2);
    assert!(h.take(0).is_empty(), "not yet");
    h.watermark(5 * MIN - 1);
    assert_eq!(
        h.take(0),
        vec![
            r#"{"k":"a","window_start":"1970-01-01T00:00:00.000Z","window_end":"1970-01-01T00:05:00.000Z","n":2}"#
        ]
    );
    h.watermark(i64::MAX);
    assert_eq!(
        h.take(0).len(),
        1,
        "the record exactly at the end belongs to the next window"
    );
}

#[test]
fn lateness_updates_then_drops_at_the_bound() {
    let (mut h, s) = harness(
        WindowKind::Sliced {
            size: 5 * MIN,
            slide: 5 * MIN,
        },
        MIN,
        &["count(DISTINCT u) AS users"],
    );
    h.push(0, rows(&s, &[("a", "x", MIN)]));
    h.watermark(5 * MIN - 1);
    assert_eq!(h.take(0).len(), 1);
    // late but allowed: the row is emitted again with the new value
    h.watermark(6 * MIN - 2);
    h.push(0, rows(&s, &[("a", "y", 2 * MIN), ("a", "x", 3 * MIN)]));
    let updated = h.take(0);
    assert_eq!(updated.len(), 1, "one update per window per batch");
    assert!(updated[0].contains(r#""users":2"#), "{updated:?}");
    assert!(h.take(1).is_empty());
    // exactly at the lateness bound (end - 1 + lateness): too late, goes to the late output
    h.watermark(6 * MIN - 1);
    h.push(0, rows(&s, &[("a", "z", 4 * MIN)]));
    assert!(h.take(0).is_empty());
    assert_eq!(h.take(1), vec![r#"{"k":"a","u":"z"}"#]);
    assert_eq!(h.metrics.snapshot().late_records, 1);
}

#[test]
fn sliding_windows_merge_slices_and_clean_up() {
    let (mut h, s) = harness(
        WindowKind::Sliced {
            size: 2 * MIN,
            slide: MIN,
        },
        0,
        &["count(*) AS n"],
    );
    h.push(
        0,
        rows(
            &s,
            &[("a", "x", 30_000), ("a", "x", 90_000), ("b", "x", 90_000)],
        ),
    );
    h.watermark(i64::MAX);
    let mut out = h.take(0);
    out.sort();
    let expect = [
        // a: windows ending 1m (1 row), 2m (2 rows), 3m (1 row); b: 2m and 3m
        ("a", "00:01:00", 1),
        ("a", "00:02:00", 2),
        ("a", "00:03:00", 1),
        ("b", "00:02:00", 1),
        ("b", "00:03:00", 1),
    ];
    assert_eq!(out.len(), expect.len(), "{out:?}");
    for (k, end, n) in expect {
        assert!(
            out.iter().any(|l| l.contains(&format!(r#""k":"{k}""#))
                && l.contains(&format!("T{end}.000Z\",\"n\":{n}"))),
            "missing {k} {end} {n} in {out:?}"
        );
    }
    assert!(
        h.op.panes.namespaces().is_empty()
            && h.op.fire.in_memory() == 0
            && h.op.cleanup.in_memory() == 0,
        "all state released"
    );
}

#[test]
fn sessions_merge_when_a_record_bridges_them() {
    let (mut h, s) = harness(WindowKind::Session { gap: MIN }, 0, &["count(*) AS n"]);
    h.push(0, rows(&s, &[("a", "x", 0), ("a", "x", 100_000)]));
    h.push(0, rows(&s, &[("a", "x", 50_000)]));
    h.push(0, rows(&s, &[("b", "x", 0)]));
    h.watermark(i64::MAX);
    let mut out = h.take(0);
    out.sort();
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(
        out[0].contains(r#""window_end":"1970-01-01T00:02:40.000Z","n":3"#),
        "{out:?}"
    );
    assert!(out[1].contains(r#""k":"b""#) && out[1].contains(r#""n":1"#));
}

/// A session merged into another, or whose end moves, gives up its timer: each session waits
/// on one fire timer, and on no cleanup timer without lateness (firing drops it), so firing
/// reads no session that is gone. With lateness, one cleanup timer per session.
#[test]
fn each_session_waits_on_one_timer() {
    for lateness in [0, MIN] {
        let (mut h, s) = harness(
            WindowKind::Session { gap: MIN },
            lateness,
            &["count(*) AS n"],
        );
        h.push(0, rows(&s, &[("a", "x", 0), ("a", "x", 100_000)]));
        h.push(0, rows(&s, &[("a", "x", 50_000), ("b", "x", 0)]));
        // b's session grows twice in one batch
        h.push(0, rows(&s, &[("b", "x", 30_000), ("b", "x", 70_000)]));
        assert_eq!(h.op.fire.in_memory(), 2, "lateness {lateness}");
        let cleanups = if lateness == 0 { 0 } else { 2 };
        assert_eq!(h.op.cleanup.in_memory(), cleanups, "lateness {lateness}");
        h.watermark(i64::MAX);
        let mut out = h.take(0);
        out.sort();
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(out[0].contains(r#""window_end":"1970-01-01T00:02:40.000Z","n":3"#));
        assert!(out[1].contains(r#""window_end":"1970-01-01T00:02:10.000Z","n":3"#));
        assert_eq!(h.op.sessions.len(), 0, "all sessions dropped");
    }
}

/// More sessions than one firing batch holds end at once, after a second record of each key
/// extended its session and the timers of the first ends, already in RocksDB, were deleted:
/// every session fires, once.
#[test]
fn every_session_fires_when_more_than_a_batch_end_at_once() {
    let n = FIRE_BATCH + 1000;
    let (mut h, s) = harness(
        WindowKind::Session { gap: 1000 * MIN },
        0,
        &["count(*) AS n"],
    );
    let dir = tempfile::tempdir().unwrap();
    let b = crate::testing::capped_backend(dir.path(), 64);
    h.op.sessions.attach(&b).unwrap();
    h.op.fire.attach(&b).unwrap();
    let keys: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
    for visit in 0..2 {
        let recs: Vec<(&str, &str, i64)> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.as_str(), "x", (visit * n + i) as i64))
            .collect();
        h.push(0, rows(&s, &recs));
        // the first ends' timers are written; their deletes stay in memory
        if visit == 0 {
            h.op.sessions.flush().unwrap();
            h.op.fire.flush().unwrap();
        }
    }
    h.watermark(i64::MAX);
    let out = h.take(0);
    assert_eq!(out.len(), n);
    assert!(
        out.iter().all(|l| l.contains(r#""n":2"#)),
        "{:?}",
        &out[..3]
    );
}

/// Session windows over many keys, with state read back from RocksDB (a cache of a few keys,
/// timers and sessions written out after every batch) and in memory, give the sessions an
/// independent model computes: per key, its times in order, split where two are a gap or more
/// apart. Batches hold several rows of a key, out of order within the batch; the watermark
/// trails the input, so sessions fire and are dropped along the way, and no row is late.
#[test]
fn sessions_of_many_keys_match_a_model_in_memory_and_from_rocksdb() {
    let gap = 3000;
    let mut next = xorshift(7);
    // batches of (key, time); the times of batch i lie in [i * 4000, i * 4000 + 6000)
    let batches: Vec<Vec<(String, i64)>> = (0..60)
        .map(|i| {
            (0..40)
                .map(|_| {
                    let k = format!("k{}", next() % 25);
                    (k, i * 4000 + (next() % 6000) as i64)
                })
                .collect()
        })
        .collect();
    let mut model: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (k, t) in batches.iter().flatten() {
        model.entry(k.clone()).or_default().push(*t);
    }
    let mut want = Vec::new();
    for (k, mut times) in model {
        times.sort_unstable();
        let mut start = 0;
        for i in 1..=times.len() {
            if i == times.len() || times[i] - times[i - 1] >= gap {
                want.push((
                    k.clone(),
                    times[start],
                    times[i - 1] + gap,
                    (i - start) as i64,
                ));
                start = i;
            }
        }
    }
    want.sort();
    let dir = tempfile::tempdir().unwrap();
    for attached in [false, true] {
        let (mut h, s) = harness(WindowKind::Session { gap }, 0, &["count(*) AS n"]);
        if attached {
            let b = crate::testing::capped_backend(dir.path(), 4);
            h.op.sessions.attach(&b).unwrap();
            h.op.fire.attach(&b).unwrap();
            h.op.cleanup.attach(&b).unwrap();
        }
        let mut got = Vec::new();
        let mut take = |h: &mut Harness<WindowOperator>| {
            for line in h.take(0) {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let ms = |f: &str| {
                    chrono::DateTime::parse_from_rfc3339(v[f].as_str().unwrap())
                        .unwrap()
                        .timestamp_millis()
                };
                got.push((
                    v["k"].as_str().unwrap().to_string(),
                    ms("window_start"),
                    ms("window_end"),
                    v["n"].as_i64().unwrap(),
                ));
            }
            assert!(h.take(1).is_empty(), "no row is late");
        };
        for (i, b) in batches.iter().enumerate() {
            let recs: Vec<(&str, &str, i64)> =
                b.iter().map(|(k, t)| (k.as_str(), "x", *t)).collect();
            h.push(0, rows(&s, &recs));
            if attached {
                h.op.sessions.flush().unwrap();
                h.op.fire.flush().unwrap();
            }
            h.watermark((i as i64 + 1) * 4000 - 1);
            take(&mut h);
        }
        h.watermark(i64::MAX);
        take(&mut h);
        got.sort();
        assert_eq!(got, want, "attached: {attached}");
        assert!(want.len() > 100, "{} sessions", want.len());
    }
}

#[test]
fn key_seen_once_and_empty_input() {
    let (mut h, s) = harness(
        WindowKind::Sliced {
            size: MIN,
            slide: MIN,
        },
        0,
        &["count(*) AS n", "min(u)", "top_n(u, 2)"],
    );
    h.push(0, rows(&s, &[]));
    h.watermark(i64::MAX);
    assert!(h.take(0).is_empty());
    let (mut h, s) = harness(
        WindowKind::Sliced {
            size: MIN,
            slide: MIN,
        },
        0,
        &["count(*) AS n", "min(u)", "top_n(u, 2)"],
    );
    h.push(0, rows(&s, &[("solo", "x", 10)]));
    h.watermark(i64::MAX);
    assert_eq!(
        h.take(0),
        vec![
            r#"{"k":"solo","window_start":"1970-01-01T00:00:00.000Z","window_end":"1970-01-01T00:01:00.000Z","n":1,"min":"x","top_n":["x"]}"#
        ]
    );
}

#[test]
fn sliding_record_too_late_for_early_windows_counts_only_for_later_ones() {
    let (mut h, s) = harness(
        WindowKind::Sliced {
            size: 3 * MIN,
            slide: MIN,
        },
        0,
        &["count(*) AS n"],
    );
    h.push(0, rows(&s, &[("a", "x", 30_000)]));
    // the window [-2m, 1m) fired; the record at 0:40 is too late for it but counts in [-1m, 2m)
    // and [0, 3m). The operator's own watermark is held back (as if another input lagged), so
    // nothing has fired yet when it arrives.
    h.wm = Watermark(MIN);
    let ctx_wm = Watermark(-1);
    {
        let ctx = OperatorContext {
            subtask: &h.info,
            record_watermark: Watermark(MIN),
            current_watermark: ctx_wm,
            metrics: &h.metrics,
        };
        h.op.process_batch(0, rows(&s, &[("a", "y", 40_000)]), &ctx, &mut h.out)
            .unwrap();
    }
    h.watermark(i64::MAX);
    let mut out = h.take(0);
    out.sort();
    let ends: Vec<(String, i64)> = out
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["window_end"].as_str().unwrap()[11..16].to_string(),
                v["n"].as_i64().unwrap(),
            )
        })
        .collect();
    let expect = [("00:01", 1), ("00:02", 2), ("00:03", 2)].map(|(e, n)| (e.to_string(), n));
    assert_eq!(ends, expect, "{out:?}");
}

/// Windows that fire on one watermark leave a call at most a batch at a time: the operator says
/// it has more, and every window still fires once, in (end, key) order.
/// Fires every window, one `on_watermark` call at a time as long as the operator has more, and
/// checks that no call emits more than [`FIRE_BATCH`] rows: the number of calls and the rows.
fn fire_all(h: &mut Harness<WindowOperator>) -> (usize, crate::testing::Sink) {
    let ctx = OperatorContext {
        subtask: &h.info,
        record_watermark: Watermark(i64::MAX),
        current_watermark: Watermark(i64::MAX),
        metrics: &h.metrics,
    };
    let mut calls = 0;
    let mut out = crate::testing::Sink::default();
    loop {
        let before = out.0.len();
        h.op.on_watermark(Watermark(i64::MAX), &ctx, &mut out)
            .unwrap();
        calls += 1;
        let emitted: usize = out.0[before..].iter().map(|(_, b)| b.num_rows()).sum();
        assert!(emitted <= FIRE_BATCH, "one call emitted {emitted} rows");
        if !h.op.has_more_output() {
            return (calls, out);
        }
    }
}

#[test]
fn many_windows_firing_at_once_are_emitted_a_batch_per_call() {
    let (mut h, s) = harness(
        WindowKind::Sliced {
            size: 5 * MIN,
            slide: 5 * MIN,
        },
        0,
        &["count(*) AS n"],
    );
    let n = 2 * FIRE_BATCH + 100;
    let keys: Vec<String> = (0..n).map(|i| format!("k{i:05}")).collect();
    let input: Vec<(&str, &str, i64)> = keys.iter().map(|k| (k.as_str(), "x", 0)).collect();
    h.push(0, rows(&s, &input));
    let (calls, out) = fire_all(&mut h);
    assert_eq!(calls, 3);
    let total: usize = out.0.iter().map(|(_, b)| b.num_rows()).sum();
    assert_eq!(total, n);
    assert!(
        h.op.panes.namespaces().is_empty(),
        "the fired slices were released"
    );
}

/// Sliding windows over slices that hold different sets of keys, more keys than one call fires:
/// the slices' chunks are merged in key order, and every (key, window) is emitted exactly once
/// with its count.
#[test]
fn sliding_windows_fire_every_key_of_their_slices_once_in_chunks() {
    let (mut h, s) = harness(
        WindowKind::Sliced {
            size: 3 * MIN,
            slide: MIN,
        },
        0,
        &["count(*) AS n"],
    );
    let n = 2 * FIRE_BATCH + 300;
    let keys: Vec<String> = (0..n).map(|i| format!("k{i:05}")).collect();
    // key i has 1 + i % 4 records in slice i % 3, and one more in slice 2 if i is even
    let mut input: Vec<(&str, &str, i64)> = Vec::new();
    let mut want: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for (i, k) in keys.iter().enumerate() {
        let mut slices = vec![(i % 3) as i64; 1 + i % 4];
        if i % 2 == 0 {
            slices.push(2);
        }
        for slice in slices {
            input.push((k.as_str(), "x", slice * MIN + 7));
            for end in slice + 1..=slice + 3 {
                *want.entry((k.clone(), end * MIN)).or_default() += 1;
            }
        }
    }
    h.push(0, rows(&s, &input));
    let (_, out) = fire_all(&mut h);
    let mut got: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for (_, b) in &out.0 {
        let k = b.column_by_name("k").unwrap().as_string::<i32>();
        let end = b
            .column_by_name("window_end")
            .unwrap()
            .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
        let c = b.column_by_name("n").unwrap().as_primitive::<Int64Type>();
        for r in 0..b.num_rows() {
            let prev = got.insert((k.value(r).to_string(), end.value(r)), c.value(r));
            assert!(
                prev.is_none(),
                "{} window {} twice",
                k.value(r),
                end.value(r)
            );
        }
    }
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
}

/// Rows are added a group at a time; the result must not depend on how input is batched. The same
/// out-of-order records with late arrivals go through a sliding window with lateness once in
/// batches and once a record at a time, and the final upsert of every window agrees.
#[test]
fn results_do_not_depend_on_batching() {
    /// How the test's records reach the window.
    #[derive(Clone, Copy)]
    enum Feed {
        /// A batch per step.
        Batched,
        /// A batch per record.
        Single,
        /// Each step's batch in two selections split by the hash of `k` (as an edge splits
        /// it), with keys encoded by `k` (true) or by another column, so that the window
        /// encodes them itself.
        Selected(bool),
    }
    let run = |kind: WindowKind, feed: Feed| {
        let (mut h, s) = harness(
            kind,
            2 * MIN,
            &["count(*) AS n", "count(DISTINCT u) AS d", "min(u) AS lo"],
        );
        let mut next = xorshift(11);
        let mut seen = Upserts::default();
        let mut collect = |h: &mut Harness<WindowOperator>| seen.collect(h);
        let keys = ["a", "b", "c", "d", "e"];
        let users = ["p", "q", "r", "s"];
        for step in 0..40i64 {
            let recs: Vec<(&str, &str, i64)> = (0..25)
                .map(|_| {
                    let r = next();
                    // mostly near the head of time, some far behind it
                    let back = if r.is_multiple_of(5) { 8 * MIN } else { MIN };
                    let t = (step * MIN / 2 - (r >> 12) as i64 % back).max(0);
                    (
                        keys[(r >> 40) as usize % 5],
                        users[(r >> 50) as usize % 4],
                        t,
                    )
                })
                .collect();
            match feed {
                Feed::Batched => h.push(0, rows(&s, &recs)),
                Feed::Single => {
                    for r in &recs {
                        h.push(0, rows(&s, std::slice::from_ref(r)));
                    }
                }
                Feed::Selected(same_key) => {
                    let by = if same_key { "k" } else { "u" };
                    for rows in selections(&rows(&s, &recs), "k", by) {
                        h.push_selection(0, rows);
                    }
                }
            }
            h.watermark(step * MIN / 2 - 2 * MIN);
            collect(&mut h);
        }
        h.watermark(i64::MAX);
        collect(&mut h);
        (seen.last, seen.late)
    };
    for kind in [
        WindowKind::Sliced {
            size: 4 * MIN,
            slide: MIN,
        },
        WindowKind::Session { gap: MIN / 6 },
    ] {
        let (batched, late_b) = run(kind, Feed::Batched);
        let (single, late_s) = run(kind, Feed::Single);
        assert!(batched.len() > 20, "{kind:?}: {} windows", batched.len());
        assert!(
            late_b > 0,
            "{kind:?}: the input has records too late for every window"
        );
        assert_eq!(late_b, late_s, "{kind:?}");
        // sessions emitted before a later record merged them stay in the map, and which are
        // emitted depends on batching; within a batch, a key's records in order give the same
        if matches!(kind, WindowKind::Sliced { .. }) {
            assert_eq!(batched, single, "{kind:?}");
        }
        for same_key in [true, false] {
            let (selected, late_sel) = run(kind, Feed::Selected(same_key));
            assert_eq!(late_b, late_sel, "{kind:?}");
            assert_eq!(batched, selected, "{kind:?}, same key: {same_key}");
        }
    }
}

/// An operator over `backend` (restored or empty) for key groups `range` of 128.
fn attached(
    kind: WindowKind,
    lateness: i64,
    backend: &Arc<KeyedBackend>,
    range: KeyGroupRange,
) -> (Harness<WindowOperator>, SchemaRef) {
    let (mut h, s) = harness(kind, lateness, &["count(*) AS n"]);
    h.op.max_parallelism = 128;
    h.op.key_groups = range;
    h.op.panes.attach(backend).unwrap();
    (h, s)
}

fn state_config(dir: &std::path::Path) -> freshet_engine::state::StateConfig {
    freshet_engine::state::StateConfig {
        local_dir: dir.to_path_buf(),
        ..Default::default()
    }
}

/// An empty keyed-state instance in `dir/name` for key groups `range` of 128.
fn empty_backend(dir: &std::path::Path, name: &str, range: KeyGroupRange) -> Arc<KeyedBackend> {
    Arc::new(KeyedBackend::open(&dir.join(name), &state_config(dir), range, 128).unwrap())
}

/// Snapshots `backend` into `dir/name` and restores it for `range`.
fn snapshot_and_restore(
    backend: &Arc<KeyedBackend>,
    dir: &std::path::Path,
    name: &str,
    from: KeyGroupRange,
    range: KeyGroupRange,
) -> Arc<KeyedBackend> {
    let snap = dir.join(format!("snap-{name}"));
    backend.begin_snapshot().unwrap().take(&snap).unwrap();
    let copy = dir.join(format!("copy-{name}"));
    std::fs::create_dir_all(&copy).unwrap();
    for f in std::fs::read_dir(&snap).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), copy.join(f.file_name())).unwrap();
    }
    Arc::new(
        KeyedBackend::restore(
            &dir.join(format!("db-{name}")),
            &state_config(dir),
            range,
            128,
            vec![(copy, from)],
        )
        .unwrap(),
    )
}

/// Counts per (key, `bound`) of the window rows in `out` (`bound`: `window_start` or
/// `window_end`), added to `seen`; a row seen before fails the test.
type Seen = std::collections::HashMap<(String, String), i64>;

fn record_once(out: &crate::testing::Sink, bound: &str, seen: &mut Seen) {
    for (port, b) in &out.0 {
        assert_eq!(*port, 0);
        let mut buf = Vec::new();
        crate::json::write_rows(b, &mut buf).unwrap();
        for line in String::from_utf8(buf).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let key = (v["k"].to_string(), v[bound].to_string());
            let count = v["n"].as_i64().unwrap();
            assert!(
                seen.insert(key.clone(), count).is_none(),
                "{key:?} emitted twice"
            );
        }
    }
}

/// A snapshot taken while a window fired, a batch of keys at a time, restored at parallelism
/// 2: every (key, window) row comes out exactly once across the run before and the two after.
#[test]
fn a_snapshot_taken_while_a_window_fires_restores_without_repeats_or_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let all = KeyGroupRange::for_subtask(128, 1, 0);
    let backend = empty_backend(dir.path(), "db", all);
    let kind = WindowKind::Sliced {
        size: 10 * MIN,
        slide: 5 * MIN,
    };
    let (mut h, s) = attached(kind, 0, &backend, all);
    let n = FIRE_BATCH + 500;
    let keys: Vec<String> = (0..n).map(|i| format!("k{i:05}")).collect();
    // every key in slices 0 and 5 (minutes): windows ending at 5, 10 and 15
    for t in [0, 5 * MIN] {
        let input: Vec<(&str, &str, i64)> = keys.iter().map(|k| (k.as_str(), "x", t)).collect();
        h.push(0, rows(&s, &input));
    }
    // two calls: window 5 whole (4 096 rows, then 500), then window 10 for its first 3 596 keys
    let ctx = OperatorContext {
        subtask: &h.info,
        record_watermark: Watermark(10 * MIN),
        current_watermark: Watermark(10 * MIN),
        metrics: &h.metrics,
    };
    let mut before = crate::testing::Sink::default();
    for _ in 0..2 {
        h.op.on_watermark(Watermark(10 * MIN), &ctx, &mut before)
            .unwrap();
        assert!(h.op.has_more_output());
    }
    h.op.panes.flush().unwrap();
    let mark = h.op.mark();
    assert!(
        mark.firing.is_some(),
        "the snapshot is taken halfway through a window"
    );
    let mut seen = Seen::default();
    record_once(&before, "window_end", &mut seen);
    for sub in 0..2 {
        let range = KeyGroupRange::for_subtask(128, 2, sub);
        let restored = snapshot_and_restore(&backend, dir.path(), &format!("p2-{sub}"), all, range);
        let (mut r, _) = attached(kind, 0, &restored, range);
        r.op.restore_marks(vec![mark.clone()]);
        r.watermark(i64::MAX);
        record_once(&r.out, "window_end", &mut seen);
    }
    // each key: window 5 counts slice 0, window 10 both slices, window 15 slice 5
    assert_eq!(seen.len(), 3 * n, "every (key, window) once");
    assert!(
        seen.iter()
            .all(|((_, end), c)| *c == if end.contains("00:10:00") { 2 } else { 1 })
    );
}

/// Session windows whose state spilled to RocksDB, all due at once (the end of the input), fire
/// by one pass over their table, a batch of keys per call, reading no key on its own; a
/// snapshot taken halfway through, restored at parallelism 2, fires the rest: every session
/// exactly once with its count, as the run that was not interrupted fires them.
#[test]
fn sessions_all_due_fire_by_one_pass_and_a_snapshot_halfway_restores_without_repeats_or_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let all = KeyGroupRange::for_subtask(128, 1, 0);
    let backend = crate::testing::capped_backend(dir.path(), 256);
    let kind = WindowKind::Session { gap: MIN };
    let open = |b: &Arc<KeyedBackend>, range: KeyGroupRange| {
        let (mut h, s) = harness(kind, 0, &["count(*) AS n"]);
        h.op.max_parallelism = 128;
        h.op.key_groups = range;
        h.op.sessions.attach(b).unwrap();
        h.op.fire.attach(b).unwrap();
        h.op.cleanup.attach(b).unwrap();
        (h, s)
    };
    let (mut h, s) = open(&backend, all);
    let n = 2 * FIRE_BATCH + 300;
    let keys: Vec<String> = (0..n).map(|i| format!("k{i:05}")).collect();
    // per key: a session of two records from 0, and one of one record from 10 minutes
    for t in [0, MIN / 2, 10 * MIN] {
        let input: Vec<(&str, &str, i64)> = keys.iter().map(|k| (k.as_str(), "x", t)).collect();
        h.push(0, rows(&s, &input));
    }
    assert!(h.op.sessions.spills());
    let wm = Watermark(100 * MIN);
    let ctx = OperatorContext {
        subtask: &h.info,
        record_watermark: wm,
        current_watermark: wm,
        metrics: &h.metrics,
    };
    let mut before = crate::testing::Sink::default();
    let reads = h.op.sessions.reads();
    h.op.on_watermark(wm, &ctx, &mut before).unwrap();
    assert!(h.op.has_more_output() && h.op.draining.is_some());
    // what a snapshot writes
    h.op.sessions.flush().unwrap();
    h.op.fire.flush().unwrap();
    let record =
        |out: &crate::testing::Sink, seen: &mut Seen| record_once(out, "window_start", seen);
    let mut seen = Seen::default();
    record(&before, &mut seen);
    assert_eq!(
        seen.len(),
        2 * FIRE_BATCH,
        "a batch of keys, each with its two sessions"
    );
    for sub in 0..2 {
        let range = KeyGroupRange::for_subtask(128, 2, sub);
        let restored = snapshot_and_restore(&backend, dir.path(), &format!("s{sub}"), all, range);
        let (mut r, _) = open(&restored, range);
        r.watermark(wm.0);
        assert_eq!(r.op.sessions.reads(), 0, "no key is read on its own");
        record(&r.out, &mut seen);
        r.out.0.clear();
        r.watermark(i64::MAX);
        assert!(r.take(0).is_empty(), "nothing is left to fire");
    }
    let expect = |seen: &Seen| {
        assert_eq!(seen.len(), 2 * n, "every session once");
        assert!(
            seen.iter()
                .all(|((_, start), c)| *c == if start.contains("00:00:00") { 2 } else { 1 })
        );
    };
    expect(&seen);
    // the run that went on without a snapshot fires the same
    h.watermark(wm.0);
    let mut uninterrupted = Seen::default();
    record(&before, &mut uninterrupted);
    record(&h.out, &mut uninterrupted);
    expect(&uninterrupted);
    assert_eq!(h.op.sessions.reads(), reads);
    assert!(!h.op.sessions.spills() && h.op.fire.latest().is_none());
}

/// A session that is not due when every fire timer is (state whose timer was lost: no path of
/// the operator makes one) is put back by the pass over the table with a timer of its own, and
/// fires once, when the watermark reaches it, not before.
#[test]
fn a_session_not_due_when_the_table_is_drained_is_put_back_with_its_timer() {
    let dir = tempfile::tempdir().unwrap();
    let backend = crate::testing::capped_backend(dir.path(), 16);
    let (mut h, s) = harness(WindowKind::Session { gap: MIN }, 0, &["count(*) AS n"]);
    h.op.sessions.attach(&backend).unwrap();
    h.op.fire.attach(&backend).unwrap();
    h.op.cleanup.attach(&backend).unwrap();
    let keys: Vec<String> = (0..200).map(|i| format!("k{i:03}")).collect();
    let input: Vec<(&str, &str, i64)> = keys.iter().map(|k| (k.as_str(), "x", 0)).collect();
    h.push(0, rows(&s, &input));
    let mut accs = Accs::new();
    accs.push(aggregate::Acc::Count(7));
    let set: Sessions = smallvec::smallvec![(
        90 * MIN,
        Session {
            end: 100 * MIN,
            accs
        }
    )];
    let set = SessionSet::encode(&set).unwrap();
    h.op.sessions
        .update(
            &encoded_key("z"),
            0,
            0,
            Watermark::MIN,
            SessionSet::default,
            |s| *s = set,
        )
        .unwrap();
    assert!(h.op.sessions.spills());
    h.watermark(50 * MIN);
    let fired = h.take(0);
    assert_eq!(fired.len(), 200, "every session due, and not z's");
    assert!(fired.iter().all(|l| !l.contains(r#""k":"z""#)));
    assert_eq!(h.op.fire.latest(), Some(100 * MIN - 1));
    h.watermark(100 * MIN - 2);
    assert!(h.take(0).is_empty());
    h.watermark(100 * MIN - 1);
    let z = h.take(0);
    assert_eq!(z.len(), 1);
    assert!(
        z[0].contains(r#""k":"z""#) && z[0].contains(r#""n":7"#),
        "{z:?}"
    );
    h.watermark(i64::MAX);
    assert!(h.take(0).is_empty());
}

/// The key column `k = k` as the window encodes it.
fn encoded_key(k: &str) -> Vec<u8> {
    let mut keys = EncodedKeys::default();
    let s = schema(vec![Field::new("k", DataType::Utf8, true)]);
    let b = batch(&s, vec![Arc::new(StringArray::from(vec![k]))], &[0]);
    KeyColumns::resolve(&s, &["k".to_string()])
        .unwrap()
        .encode(&b, &mut keys)
        .unwrap();
    keys.row(0).to_vec()
}

/// State of the layout before panes (a keyed row per (key, slice), a timer per (key, window)),
/// snapshotted while window 10 fired (key a had fired it and lost its first slice; b and c had
/// not): the window moves it into panes and fires what was pending, and nothing twice.
#[test]
fn state_of_the_keyed_layout_is_moved_into_panes() {
    let dir = tempfile::tempdir().unwrap();
    let all = KeyGroupRange::for_subtask(128, 1, 0);
    let old = empty_backend(dir.path(), "old", all);
    let count = |n: i64| -> SliceParts {
        let mut accs = Accs::new();
        accs.push(aggregate::Acc::Count(n));
        smallvec::smallvec![(0, accs)]
    };
    let (a, b, c) = (encoded_key("a"), encoded_key("b"), encoded_key("c"));
    let m = MIN;
    let mut slices: KeyedTable<SliceParts> = KeyedTable::new("window-slices", None);
    slices.attach(&old).unwrap();
    let mut fire = Timers::new("fire");
    fire.attach(&old).unwrap();
    for (key, slice, n) in [(&a, 5 * m, 1), (&b, 5 * m, 3), (&c, 0, 4)] {
        slices
            .update(
                key,
                slice,
                0,
                Watermark::MIN,
                || count(0),
                |p| *p = count(n),
            )
            .unwrap();
    }
    for (key, end) in [(&a, 15 * m), (&b, 10 * m), (&b, 15 * m), (&c, 10 * m)] {
        fire.register(end - 1, key).unwrap();
    }
    slices.flush().unwrap();
    fire.flush().unwrap();
    let restored = snapshot_and_restore(&old, dir.path(), "old", all, all);
    let kind = WindowKind::Sliced {
        size: 10 * m,
        slide: 5 * m,
    };
    let (mut h, _) = attached(kind, 0, &restored, all);
    h.op.move_from_keyed_layout(&restored, 10 * m, 5 * m)
        .unwrap();
    h.watermark(i64::MAX);
    let mut got: Vec<String> = h
        .take(0)
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {} {}", v["k"], v["window_end"], v["n"])
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            r#""a" "1970-01-01T00:15:00.000Z" 1"#,
            r#""b" "1970-01-01T00:10:00.000Z" 3"#,
            r#""b" "1970-01-01T00:15:00.000Z" 3"#,
            r#""c" "1970-01-01T00:10:00.000Z" 4"#,
        ]
    );
}

/// Session windows of the layout before sets per key (a row per (key, session start)) are
/// moved into sets when restored: a key's two sessions and another key's one fire once each,
/// and a record after the restore merges into the restored session it touches (whose timer
/// moves with its end).
#[test]
fn sessions_of_the_row_per_session_layout_are_moved_into_sets() {
    let dir = tempfile::tempdir().unwrap();
    let all = KeyGroupRange::for_subtask(128, 1, 0);
    let old = empty_backend(dir.path(), "old", all);
    let (a, b) = (encoded_key("a"), encoded_key("b"));
    let mut rows_table: KeyedTable<Session> = KeyedTable::new(SESSION_ROWS, None);
    rows_table.attach(&old).unwrap();
    let mut fire = Timers::new("fire");
    fire.attach(&old).unwrap();
    for (key, start, end, n) in [
        (&a, 0, MIN, 2),
        (&a, 200_000, 200_000 + MIN, 1),
        (&b, 10_000, 10_000 + MIN, 4),
    ] {
        let mut accs = Accs::new();
        accs.push(aggregate::Acc::Count(n));
        rows_table
            .update(
                key,
                start,
                0,
                Watermark::MIN,
                || Session {
                    end,
                    accs: Accs::new(),
                },
                |s| *s = Session { end, accs },
            )
            .unwrap();
        fire.register(end - 1, key).unwrap();
    }
    rows_table.flush().unwrap();
    fire.flush().unwrap();
    drop(rows_table);
    let restored = snapshot_and_restore(&old, dir.path(), "old", all, all);
    let (mut h, s) = harness(WindowKind::Session { gap: MIN }, 0, &["count(*) AS n"]);
    h.op.sessions.attach(&restored).unwrap();
    h.op.fire.attach(&restored).unwrap();
    h.op.move_session_rows(&restored).unwrap();
    assert_eq!(h.op.sessions.len(), 2, "one set per key");
    h.push(0, rows(&s, &[("a", "x", 30_000)]));
    h.watermark(i64::MAX);
    let mut got: Vec<String> = h
        .take(0)
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{} {} {} {}",
                v["k"], v["window_start"], v["window_end"], v["n"]
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            r#""a" "1970-01-01T00:00:00.000Z" "1970-01-01T00:01:30.000Z" 3"#,
            r#""a" "1970-01-01T00:03:20.000Z" "1970-01-01T00:04:20.000Z" 1"#,
            r#""b" "1970-01-01T00:00:10.000Z" "1970-01-01T00:01:10.000Z" 4"#,
        ]
    );
    let mut again: KeyedTable<Session> = KeyedTable::new(SESSION_ROWS, None);
    again.attach(&restored).unwrap();
    assert!(
        again.take_all().unwrap().is_empty(),
        "the old rows are deleted"
    );
}

/// Spilling does not change results. The same out-of-order input, with records late for some
/// windows of their slice, goes through a sliding window with lateness twice: with memory for
/// every slice, and with the smallest budget, under which slices spill again and again (late
/// partials among what they spill) and windows fire from many generations, reading no further
/// ahead than they fire. Every window's last result agrees. With counts alone, spilled values are read by the reader of common shapes
/// (`encoded`); with a distinct count beside them, through serde.
#[test]
fn results_do_not_depend_on_spilling() {
    let kind = WindowKind::Sliced {
        size: 8 * MIN,
        slide: 2 * MIN,
    };
    let users = ["p", "q", "r", "s"];
    let keys: Vec<String> = (0..20_000)
        .map(|i| format!("a-key-long-enough-to-be-kept-apart-{i:06}"))
        .collect();
    let run = |aggs: &[&str], memory_bytes: usize, read_ahead: usize| {
        let dir = tempfile::tempdir().unwrap();
        let all = KeyGroupRange::for_subtask(128, 1, 0);
        let config = freshet_engine::state::StateConfig {
            memory_bytes,
            ..state_config(dir.path())
        };
        let backend =
            Arc::new(KeyedBackend::open(&dir.path().join("db"), &config, all, 128).unwrap());
        let (mut h, s) = harness(kind, 2 * MIN, aggs);
        h.op.max_parallelism = 128;
        h.op.key_groups = all;
        h.op.read_ahead = read_ahead;
        h.op.panes.attach(&backend).unwrap();
        let mut next = xorshift(5);
        let mut seen = Upserts::default();
        let mut collect = |h: &mut Harness<WindowOperator>| seen.collect(h);
        for step in 0..30i64 {
            let recs: Vec<(&str, &str, i64)> = (0..6_000)
                .map(|_| {
                    let r = next();
                    let back = if r.is_multiple_of(7) { 13 * MIN } else { MIN };
                    let t = (step * MIN / 2 - (r >> 12) as i64 % back).max(0);
                    let key = &keys[(r >> 30) as usize % keys.len()];
                    (key.as_str(), users[(r >> 50) as usize % 4], t)
                })
                .collect();
            h.push(0, rows(&s, &recs));
            h.watermark(step * MIN / 2 - 2 * MIN);
            collect(&mut h);
        }
        h.watermark(i64::MAX);
        collect(&mut h);
        (seen.last, seen.late, backend.size().rows)
    };
    for aggs in [
        &["count(*) AS n"][..],
        &["count(*) AS n", "count(DISTINCT u) AS d"],
    ] {
        let (roomy, late_roomy, spilled_roomy) = run(aggs, 256 << 20, READ_AHEAD);
        // reading no further ahead than a chunk: slices are read again whenever one runs out
        let (tight, late_tight, spilled_tight) = run(aggs, 0, 0);
        eprintln!("{aggs:?}: rows {spilled_roomy} against {spilled_tight}");
        assert!(
            spilled_roomy < 10 && spilled_tight > 100,
            "{aggs:?}: RocksDB holds {spilled_roomy} rows with room and {spilled_tight} without"
        );
        assert!(
            late_roomy > 0,
            "{aggs:?}: some records are too late for every window"
        );
        assert_eq!(late_roomy, late_tight, "{aggs:?}");
        assert!(roomy.len() > 20_000, "{aggs:?}: {} windows", roomy.len());
        let differ: Vec<_> = roomy
            .iter()
            .filter(|(id, line)| tight.get(*id) != Some(*line))
            .take(3)
            .collect();
        assert!(differ.is_empty(), "{aggs:?}: {differ:?}");
        assert_eq!(roomy.len(), tight.len(), "{aggs:?}");
    }
}

/// A window fired a chunk at a time reads its slices ahead of what it fires. A record that
/// reaches a slice between two chunks counts for its key when the key fires, if it had not
/// fired yet, and updates the key's window at once if it had.
#[test]
fn a_record_between_two_chunks_of_a_firing_window_counts_for_its_key() {
    let kind = WindowKind::Sliced {
        size: 10 * MIN,
        slide: 10 * MIN,
    };
    let (mut h, s) = harness(kind, 30 * MIN, &["count(*) AS n"]);
    let n = FIRE_BATCH + 1000;
    let keys: Vec<String> = (0..n).map(|i| format!("k{i:05}")).collect();
    let input: Vec<(&str, &str, i64)> = keys.iter().map(|k| (k.as_str(), "x", 0)).collect();
    h.push(0, rows(&s, &input));
    let end = 10 * MIN;
    h.wm = Watermark(end - 1);
    let ctx = OperatorContext {
        subtask: &h.info,
        record_watermark: h.wm,
        current_watermark: h.wm,
        metrics: &h.metrics,
    };
    let mut first = crate::testing::Sink::default();
    h.op.on_watermark(h.wm, &ctx, &mut first).unwrap();
    assert!(h.op.has_more_output(), "one chunk of the window fired");
    let counts = |lines: Vec<String>| -> BTreeMap<String, i64> {
        lines
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["k"].as_str().unwrap().to_string(),
                    v["n"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    h.out = first;
    let fired = counts(h.take(0));
    assert_eq!(fired.len(), FIRE_BATCH);
    let waiting = keys.iter().find(|k| !fired.contains_key(*k)).unwrap();
    let done = keys.iter().find(|k| fired.contains_key(*k)).unwrap();
    // within the lateness, both reach the slice
    h.push(0, rows(&s, &[(waiting, "y", MIN), (done, "y", MIN)]));
    assert_eq!(
        counts(h.take(0)),
        BTreeMap::from([(done.clone(), 2)]),
        "the key that fired is updated at once"
    );
    h.watermark(end - 1);
    let rest = counts(h.take(0));
    assert_eq!(rest.len(), n - FIRE_BATCH);
    assert!(
        fired.keys().all(|k| !rest.contains_key(k)),
        "a key fired twice"
    );
    assert_eq!(rest[waiting], 2, "the record between the chunks counts");
    assert!(rest.iter().all(|(k, c)| *c == 1 || k == waiting));
}

/// A window without keys folds each batch's rows of a slice as one range of its columns: it
/// gives what the records on time add up to (computed here), and the same, bit for bit, when
/// each record comes in a batch of its own (floats whose sum depends on order included).
#[test]
fn a_non_keyed_window_gives_what_its_records_on_time_add_up_to() {
    use arrow::array::{Float64Array, Int64Array};
    let s = schema(vec![
        Field::new("v", DataType::Int64, false),
        Field::new("f", DataType::Float64, false),
    ]);
    let aggs: Vec<String> = [
        "count(*) AS n",
        "sum(v) AS sv",
        "min(v) AS lo",
        "max(v) AS hi",
        "sum(f) AS sf",
        "max(f) AS hf",
        "avg(f) AS af",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let floats = [0.1, 1e16, -1e16, 3.3, -0.0, 0.7, 2.5];
    let records: Vec<Vec<(i64, f64, i64)>> = {
        let mut next = xorshift(5);
        (0..30i64)
            .map(|step| {
                (0..40)
                    .map(|_| {
                        let r = next();
                        // mostly near the head of time, a few a window or more behind it
                        let back = if r.is_multiple_of(7) {
                            3 * MIN
                        } else {
                            MIN / 2
                        };
                        let t = (step * MIN / 2 - (r >> 12) as i64 % back).max(0);
                        let v = (r >> 20) as i64 % 2001 - 1000;
                        (v, floats[(r >> 40) as usize % floats.len()], t)
                    })
                    .collect()
            })
            .collect()
    };
    let watermark = |step: i64| step * MIN / 2 - MIN / 4;
    let run = |single: bool| {
        let plan = WindowPlan::compile(
            &s,
            &[],
            WindowKind::Sliced {
                size: MIN,
                slide: MIN,
            },
            0,
            &aggs,
            None,
        )
        .unwrap();
        let mut h = Harness::new(plan.instantiate());
        let mut seen = Upserts::default();
        for (step, recs) in records.iter().enumerate() {
            let chunks: Vec<&[(i64, f64, i64)]> = if single {
                recs.chunks(1).collect()
            } else {
                vec![recs]
            };
            for c in chunks {
                let b = batch(
                    &s,
                    vec![
                        Arc::new(Int64Array::from(c.iter().map(|r| r.0).collect::<Vec<_>>())),
                        Arc::new(Float64Array::from(
                            c.iter().map(|r| r.1).collect::<Vec<_>>(),
                        )),
                    ],
                    &c.iter().map(|r| r.2).collect::<Vec<_>>(),
                );
                h.push(0, b);
            }
            h.watermark(watermark(step as i64));
            seen.collect(&mut h);
        }
        h.watermark(i64::MAX);
        seen.collect(&mut h);
        seen
    };
    let (batched, single) = (run(false), run(true));
    assert_eq!(batched.last, single.last);
    assert_eq!(batched.late, single.late);
    // what each window's records on time add up to: a record is late once the watermark
    // before it reached its window's last millisecond
    let mut expected: BTreeMap<i64, (i64, i64, i64, i64)> = BTreeMap::new();
    let mut late = 0;
    for (step, recs) in records.iter().enumerate() {
        let wm = if step == 0 {
            i64::MIN
        } else {
            watermark(step as i64 - 1)
        };
        for &(v, _, t) in recs {
            let end = t - t.rem_euclid(MIN) + MIN;
            if wm >= end - 1 {
                late += 1;
                continue;
            }
            let e = expected.entry(end).or_insert((0, 0, i64::MAX, i64::MIN));
            *e = (e.0 + 1, e.1 + v, e.2.min(v), e.3.max(v));
        }
    }
    assert!(
        late > 0 && expected.len() > 10,
        "{late} late, {} windows",
        expected.len()
    );
    assert_eq!(batched.late, late);
    let got: BTreeMap<i64, (i64, i64, i64, i64)> = batched
        .last
        .values()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let end = v["window_end"].as_str().unwrap();
            let end = chrono::DateTime::parse_from_rfc3339(end)
                .unwrap()
                .timestamp_millis();
            let n = |f: &str| v[f].as_i64().unwrap();
            (end, (n("n"), n("sv"), n("lo"), n("hi")))
        })
        .collect();
    assert_eq!(got, expected);
}

/// A non-keyed window locates its one key once per batch and gives its slot to every row: its
/// results are those of a keyed window whose rows all have one key, and of counting directly.
#[test]
fn a_non_keyed_window_counts_like_a_window_of_one_key() {
    let kind = WindowKind::Sliced {
        size: 2 * MIN,
        slide: MIN,
    };
    let s = schema(vec![
        Field::new("k", DataType::Utf8, true),
        Field::new("u", DataType::Utf8, true),
    ]);
    let aggs = [
        "count(*) AS n".to_string(),
        "count(DISTINCT u) AS users".into(),
    ];
    let harness = |keys: &[String]| {
        let plan = WindowPlan::compile(&s, keys, kind, 0, &aggs, None).unwrap();
        Harness::new(plan.instantiate())
    };
    let (mut global, mut keyed) = (harness(&[]), harness(&["k".into()]));
    let mut next = xorshift(11);
    // window start -> (rows, distinct users)
    let mut expected: BTreeMap<i64, (u64, std::collections::BTreeSet<String>)> = BTreeMap::new();
    for _ in 0..40 {
        let n = (next() % 300) as usize;
        let batch: Vec<(String, i64)> = (0..n)
            .map(|_| {
                (
                    format!("u{}", next() % 50),
                    (next() % (20 * MIN as u64)) as i64,
                )
            })
            .collect();
        for (u, t) in &batch {
            let slice = t - t % MIN;
            for start in [slice - MIN, slice] {
                let w = expected.entry(start).or_default();
                w.0 += 1;
                w.1.insert(u.clone());
            }
        }
        let batch: Vec<(&str, &str, i64)> =
            batch.iter().map(|(u, t)| ("a", u.as_str(), *t)).collect();
        global.push(0, rows(&s, &batch));
        keyed.push(0, rows(&s, &batch));
    }
    let results = |h: &mut Harness<WindowOperator>| {
        h.watermark(i64::MAX);
        let mut last = BTreeMap::new();
        for line in h.take(0) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let n = v["n"].as_u64().unwrap();
            let users = v["users"].as_u64().unwrap() as usize;
            last.insert(v["window_start"].as_str().unwrap().to_string(), (n, users));
        }
        last.into_values().collect::<Vec<_>>()
    };
    let got = results(&mut global);
    assert_eq!(got, results(&mut keyed));
    let expected: Vec<(u64, usize)> = expected.values().map(|(n, u)| (*n, u.len())).collect();
    assert_eq!(got, expected);
}
