//! Edge strategies: how an upstream subtask's output is spread over the downstream subtasks.
//!
//! - `Forward`: one-to-one, upstream subtask `i` to downstream subtask `i` (same parallelism). The
//!   planner chains such edges into one thread where it can.
//! - `Rebalance`: whole batches round-robin over all downstream subtasks.
//! - `Broadcast`: every batch to every downstream subtask.
//! - `Hash`: each row goes to the subtask owning its key's key group. Keys are encoded and hashed
//!   for the whole batch, rows are grouped by target and cut out with Arrow's `take`; there is no
//!   per-row channel send.
//!
//! Watermarks, idle markers and end-of-input always go to every downstream subtask.
use arrow::array::UInt32Array;
use arrow::compute::take_record_batch;
use arrow::record_batch::RecordBatch;

use crate::channel::ChannelSender;
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
}

#[derive(Debug)]
struct HashState {
    keys: KeyColumns,
    encoded: EncodedKeys,
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
        }
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
                h.keys.encode(&batch, &mut h.encoded)?;
                let n = batch.num_rows();
                for v in h.per_target.iter_mut() {
                    v.clear();
                    v.reserve(n);
                }
                for (row, hash) in h.encoded.hashes().enumerate() {
                    h.per_target[h.owners.of(hash)].push(row as u32);
                }
                for (t, rows) in h.per_target.iter().enumerate() {
                    if rows.is_empty() {
                        continue;
                    }
                    let part = if rows.len() == n {
                        batch.clone()
                    } else {
                        take_record_batch(&batch, &UInt32Array::from(rows.clone()))?
                    };
                    send(&self.targets[t], part)?;
                }
                Ok(())
            }
        }
    }

    /// Sends a control element (watermark, idle, end-of-input) to every target.
    pub fn broadcast(&mut self, e: &Element) -> Result<()> {
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
            keys,
            encoded: EncodedKeys::default(),
            owners: KeyGroupOwners::new(max_parallelism, targets as u32),
            per_target: vec![Vec::new(); targets],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let mut total = 0;
        for (i, r) in rxs.iter().enumerate() {
            let range = KeyGroupRange::for_subtask(16, 3, i as u32);
            while let Some(Element::Batch(b)) = r.recv_timeout(Duration::from_millis(10)).unwrap() {
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
    }
}
