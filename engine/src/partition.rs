//! Edge strategies: how an upstream subtask's output is spread over the downstream subtasks.
//!
//! - `Forward`: one-to-one, upstream subtask `i` to downstream subtask `i` (same parallelism). The
//!   planner chains such edges into one thread where it can.
//! - `Rebalance`: whole batches round-robin over all downstream subtasks.
//! - `Broadcast`: every batch to every downstream subtask.
//! - `Hash`: each row goes to the subtask owning its key's key group. Keys are encoded and hashed
//!   for the whole batch and rows are grouped by target; there is no per-row channel send. On
//!   an edge into a window ([`EdgeWriter::sharing_batches`]) a target in this process gets the
//!   shared batch, its rows' indices and the encoded keys ([`Element::Rows`]), so nothing is
//!   copied and the window need not encode the keys again. Otherwise, and for targets in
//!   another process, each target gets its rows cut out with Arrow's `take`.
//!
//! Watermarks, idle markers and end-of-input go to every downstream subtask; an edge into the
//! dead-letter path drops watermarks (see [`EdgeWriter::without_watermarks`]).
use arrow::array::UInt32Array;
use arrow::compute::take_record_batch;
use arrow::record_batch::RecordBatch;
use std::sync::Arc;

use crate::channel::ChannelSender;
use crate::element::Selection;
use crate::keys::{EncodedKeys, KeyColumns, KeyGroupOwners};
use crate::{Element, EngineError, Result, Watermark};

/// How an edge distributes batches over its target subtasks.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Partitioning {
    /// Upstream subtask `i` sends only to downstream subtask `i`.
    Forward,
    /// Batches go round-robin to all downstream subtasks.
    Rebalance,
    /// Every batch goes to every downstream subtask.
    Broadcast,
    /// Rows go to the subtask owning the key group of their key.
    Hash {
        /// Names of the key columns.
        key_columns: Vec<String>,
        /// Number of key groups.
        max_parallelism: u32,
    },
}

impl std::fmt::Display for Partitioning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Partitioning::Forward => f.write_str("forward"),
            Partitioning::Rebalance => f.write_str("rebalance"),
            Partitioning::Broadcast => f.write_str("broadcast"),
            Partitioning::Hash { key_columns, .. } => write!(f, "hash({})", key_columns.join(", ")),
        }
    }
}

/// Writes one upstream subtask's output onto the channels of one edge.
#[derive(Debug)]
pub struct EdgeWriter {
    partitioning: Partitioning,
    targets: Vec<ChannelSender>,
    next: usize,
    hash: Option<HashState>,
    watermarks: bool,
    share: bool,
}

#[derive(Debug)]
struct HashState {
    keys: Arc<KeyColumns>,
    encoded: Arc<EncodedKeys>,
    owners: KeyGroupOwners,
    per_target: Vec<Vec<u32>>,
}

impl EdgeWriter {
    /// A writer over `targets` (for `Forward`, exactly one: the matching downstream subtask).
    pub fn new(partitioning: Partitioning, targets: Vec<ChannelSender>) -> Self {
        EdgeWriter {
            partitioning,
            targets,
            next: 0,
            hash: None,
            watermarks: true,
            share: false,
        }
    }

    /// The same writer, handing a hash edge's targets in this process the whole batch and
    /// their rows ([`Element::Rows`]) instead of cutting the rows out: for receivers that
    /// consume rows without passing them on (windows).
    pub fn sharing_batches(mut self) -> Self {
        self.share = true;
        self
    }

    /// The same writer, dropping watermarks: for an edge whose receivers do nothing by event
    /// time (the dead-letter path). Every other element still goes to every target.
    pub fn without_watermarks(mut self) -> Self {
        self.watermarks = false;
        self
    }

    /// The senders of this edge (to bind them to a subtask's cancel token and metrics).
    pub fn targets_mut(&mut self) -> &mut [ChannelSender] {
        &mut self.targets
    }

    /// Sends a batch according to the edge's partitioning.
    pub fn send_batch(&mut self, batch: RecordBatch) -> Result<()> {
        self.send_judged(batch, None)
    }

    /// Sends a batch whose records are judged against `judge` (ahead of the watermark this
    /// writer sent last): each target gets [`Element::Judge`] right before its part.
    pub fn send_batch_judged(&mut self, batch: RecordBatch, judge: Watermark) -> Result<()> {
        self.send_judged(batch, Some(judge))
    }

    fn send_judged(&mut self, batch: RecordBatch, judge: Option<Watermark>) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let send = |t: &ChannelSender, b: RecordBatch| -> Result<()> {
            if let Some(j) = judge {
                t.send(Element::Judge(j))?;
            }
            t.send(Element::Batch(b))
        };
        match &self.partitioning {
            Partitioning::Forward => send(&self.targets[0], batch),
            Partitioning::Rebalance => {
                let t = self.next % self.targets.len();
                self.next = self.next.wrapping_add(1);
                send(&self.targets[t], batch)
            }
            Partitioning::Broadcast => {
                for t in &self.targets {
                    send(t, batch.clone())?;
                }
                Ok(())
            }
            Partitioning::Hash {
                key_columns,
                max_parallelism,
            } => {
                let max_parallelism = *max_parallelism;
                if self.targets.len() == 1 {
                    return send(&self.targets[0], batch);
                }
                if self.hash.is_none() {
                    self.hash = Some(HashState::new(
                        key_columns,
                        &batch,
                        max_parallelism,
                        self.targets.len(),
                    )?);
                }
                let h = self.hash.as_mut().expect("initialised above");
                // the receivers may still hold the last batch's keys
                if Arc::get_mut(&mut h.encoded).is_none() {
                    h.encoded = Arc::new(EncodedKeys::default());
                }
                let encoded = Arc::get_mut(&mut h.encoded).expect("not shared");
                h.keys.encode(&batch, encoded)?;
                let n = batch.num_rows();
                for v in h.per_target.iter_mut() {
                    v.clear();
                    v.reserve(n);
                }
                for (row, hash) in h.encoded.hashes().enumerate() {
                    h.per_target[h.owners.of(hash)].push(row as u32);
                }
                for (t, rows) in h.per_target.iter_mut().enumerate() {
                    if rows.is_empty() {
                        continue;
                    }
                    let target = &self.targets[t];
                    if self.share && target.is_local() {
                        // in this process: share the batch and its keys, no copy
                        let rows = std::mem::replace(rows, Vec::with_capacity(n));
                        if let Some(j) = judge {
                            target.send(Element::Judge(j))?;
                        }
                        target.send(Element::Rows(Selection {
                            batch: batch.clone(),
                            rows,
                            keys: h.encoded.clone(),
                            key_columns: h.keys.clone(),
                        }))?;
                        continue;
                    }
                    let part = if rows.len() == n {
                        batch.clone()
                    } else {
                        take_record_batch(&batch, &UInt32Array::from(rows.clone()))?
                    };
                    send(target, part)?;
                }
                Ok(())
            }
        }
    }

    /// Sends a control element (watermark, idle, end-of-input) to every target.
    pub fn broadcast(&mut self, e: &Element) -> Result<()> {
        if !self.watermarks && matches!(e, Element::Watermark(_)) {
            return Ok(());
        }
        for t in &self.targets {
            t.send(e.clone())?;
        }
        Ok(())
    }
}

impl HashState {
    fn new(
        key_columns: &[String],
        batch: &RecordBatch,
        max_parallelism: u32,
        targets: usize,
    ) -> Result<Self> {
        let keys = KeyColumns::resolve(&batch.schema(), key_columns)
            .map_err(|(_, m)| EngineError::Operator(m))?;
        Ok(HashState {
            keys: Arc::new(keys),
            encoded: Arc::default(),
            owners: KeyGroupOwners::new(max_parallelism, targets as u32),
            per_target: vec![Vec::new(); targets],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelSender;
    use crate::channel::bounded;
    use crate::keys::{KeyEncoder, KeyGroupRange, key_group};
    use arrow::array::{AsArray, Int64Array};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn hash_routes_every_row_to_the_owner_of_its_key_group() {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from_iter_values(0..1000))],
        )
        .unwrap();
        let (mut txs, mut rxs) = (vec![], vec![]);
        for _ in 0..3 {
            let (t, r) = bounded(8);
            txs.push(t);
            rxs.push(r);
        }
        let mut w = EdgeWriter::new(
            Partitioning::Hash {
                key_columns: vec!["k".into()],
                max_parallelism: 16,
            },
            txs,
        );
        w.send_batch(batch).unwrap();
        let enc = KeyEncoder::new(&[DataType::Int64]).unwrap();
        let mut selections = 0;
        let mut total = 0;
        for (i, r) in rxs.iter().enumerate() {
            let range = KeyGroupRange::for_subtask(16, 3, i as u32);
            while let Some(e) = r.recv_timeout(Duration::from_millis(10)).unwrap() {
                let b = match e {
                    Element::Batch(b) => b,
                    Element::Rows(s) => {
                        selections += 1;
                        s.into_batch().unwrap()
                    }
                    other => panic!("unexpected {other:?}"),
                };
                for v in b.column(0).as_primitive::<Int64Type>().values() {
                    let key = enc
                        .encode_row(&[Arc::new(Int64Array::from(vec![*v]))], 0)
                        .unwrap();
                    assert!(range.contains(key_group(crate::keys::hash_key(&key), 16)));
                    total += 1;
                }
            }
        }
        assert_eq!(total, 1000);
        assert_eq!(selections, 0, "a writer not sharing batches cuts them out");
    }

    /// A channel to "another process" that keeps what it is sent.
    #[derive(Debug, Default)]
    struct Kept(std::sync::Mutex<Vec<Element>>);

    impl crate::channel::Outbound for Kept {
        fn send_timeout(&self, e: Element, _: Duration) -> Result<Option<Element>> {
            self.0.lock().unwrap().push(e);
            Ok(None)
        }
    }

    #[test]
    fn hash_shares_the_batch_in_process_and_cuts_it_for_the_network() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(0..500)),
                Arc::new(Int64Array::from_iter_values((0..500).map(|v| v * 10))),
            ],
        )
        .unwrap();
        let (local, rx) = bounded(8);
        let remote = Arc::new(Kept::default());
        let mut w = EdgeWriter::new(
            Partitioning::Hash {
                key_columns: vec!["k".into()],
                max_parallelism: 16,
            },
            vec![local, ChannelSender::remote(remote.clone())],
        )
        .sharing_batches();
        w.send_batch(batch.clone()).unwrap();
        let columns = KeyColumns::resolve(&schema, &["k".into()]).unwrap();
        let mut expected = EncodedKeys::default();
        columns.encode(&batch, &mut expected).unwrap();
        let owner =
            |row: usize| KeyGroupOwners::new(16, 2).of(crate::keys::hash_key(expected.row(row)));
        // in process: the whole batch, the rows of subtask 0, and every row's key
        let Some(Element::Rows(sel)) = rx.recv_timeout(Duration::from_millis(10)).unwrap() else {
            panic!("a selection was expected");
        };
        assert_eq!(sel.batch.num_rows(), 500);
        let mine: Vec<u32> = (0..500u32).filter(|r| owner(*r as usize) == 0).collect();
        assert!(!mine.is_empty() && mine.len() < 500);
        assert_eq!(sel.rows, mine);
        let keys = sel.keys_by(&columns).expect("keyed by the same columns");
        assert!((0..500).all(|r| keys.row(r) == expected.row(r)));
        let other = KeyColumns::resolve(&schema, &["v".into()]).unwrap();
        assert!(sel.keys_by(&other).is_none());
        // over the network: only the other rows, copied out
        let sent = remote.0.lock().unwrap();
        let [Element::Batch(part)] = &sent[..] else {
            panic!("one batch was expected, got {sent:?}");
        };
        let values: Vec<i64> = part.column(0).as_primitive::<Int64Type>().values().to_vec();
        let theirs: Vec<i64> = (0..500).filter(|r| owner(*r as usize) == 1).collect();
        assert_eq!(values, theirs);
    }

    #[test]
    fn an_edge_without_watermarks_passes_everything_else() {
        let (tx, rx) = bounded(8);
        let mut w = EdgeWriter::new(Partitioning::Forward, vec![tx]).without_watermarks();
        w.broadcast(&Element::Watermark(Watermark(5))).unwrap();
        w.broadcast(&Element::Idle).unwrap();
        w.broadcast(&Element::EndOfInput).unwrap();
        let got: Vec<String> = std::iter::from_fn(|| rx.recv_timeout(Duration::ZERO).unwrap())
            .map(|e| format!("{e:?}"))
            .collect();
        assert_eq!(got, ["Idle", "EndOfInput"]);
        let (tx, rx) = bounded(8);
        EdgeWriter::new(Partitioning::Forward, vec![tx])
            .broadcast(&Element::Watermark(Watermark(5)))
            .unwrap();
        assert!(matches!(
            rx.recv_timeout(Duration::ZERO).unwrap(),
            Some(Element::Watermark(Watermark(5)))
        ));
    }
}
