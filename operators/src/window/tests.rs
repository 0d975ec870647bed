use super::*;
use crate::testing::{Harness, batch, schema};
use arrow::array::StringArray;

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
        h.op.slices.is_empty() && h.op.fire.in_memory() == 0 && h.op.cleanup.in_memory() == 0,
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
            break;
        }
    }
    assert_eq!(calls, 3);
    let total: usize = out.0.iter().map(|(_, b)| b.num_rows()).sum();
    assert_eq!(total, n);
    assert!(h.op.slices.is_empty(), "the fired slices were released");
}

/// Rows are added a group at a time; the result must not depend on how input is batched. The same
/// out-of-order records with late arrivals go through a sliding window with lateness once in
/// batches and once a record at a time, and the final upsert of every window agrees.
#[test]
fn results_do_not_depend_on_batching() {
    let run = |batched: bool| {
        let (mut h, s) = harness(
            WindowKind::Sliced {
                size: 4 * MIN,
                slide: MIN,
            },
            2 * MIN,
            &["count(*) AS n", "count(DISTINCT u) AS d", "min(u) AS lo"],
        );
        let mut seed = 11u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut late = 0;
        let mut last: std::collections::BTreeMap<String, String> = Default::default();
        let mut collect = |h: &mut Harness<WindowOperator>| {
            for line in h.take(0) {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let id = format!("{}/{}/{}", v["k"], v["window_start"], v["window_end"]);
                last.insert(id, line);
            }
            late += h.take(1).len();
        };
        let keys = ["a", "b", "c", "d", "e"];
        let users = ["p", "q", "r", "s"];
        for step in 0..40i64 {
            let recs: Vec<(&str, &str, i64)> = (0..25)
                .map(|_| {
                    let r = next();
                    // mostly near the head of time, some far behind it
                    let back = if r % 5 == 0 { 8 * MIN } else { MIN };
                    let t = (step * MIN / 2 - (r >> 12) as i64 % back).max(0);
                    (
                        keys[(r >> 40) as usize % 5],
                        users[(r >> 50) as usize % 4],
                        t,
                    )
                })
                .collect();
            if batched {
                h.push(0, rows(&s, &recs));
            } else {
                for r in &recs {
                    h.push(0, rows(&s, std::slice::from_ref(r)));
                }
            }
            h.watermark(step * MIN / 2 - 2 * MIN);
            collect(&mut h);
        }
        h.watermark(i64::MAX);
        collect(&mut h);
        (last, late)
    };
    let (batched, late_b) = run(true);
    let (single, late_s) = run(false);
    assert!(batched.len() > 50, "{} windows", batched.len());
    assert!(
        late_b > 0,
        "the input has records too late for every window"
    );
    assert_eq!(late_b, late_s);
    assert_eq!(batched, single);
}
