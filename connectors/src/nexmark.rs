//! The Nexmark bid generator, as specified for side-by-side runs with Apache Flink: a pure
//! function of (seed, i, events per ms) using SplitMix64, so any engine can reproduce the same
//! stream, row counts and checksums.
//!
//! The number of distinct bidders is a parameter: 100 000 in the shared benchmark, more for a
//! large-state variant of the per-bidder queries (the shared generator with that constant
//! changed).
//!
//! Subtask `s` of `p` emits bids `i = s, s + p, s + 2p, ...` (the total is rounded down to a
//! multiple of `p`), so event time advances together on every subtask. Columns: `auction`,
//! `bidder`, `price` (BIGINT), `channel`, `url`, `extra` (dictionary-encoded strings: there are 4,
//! 4 and 8 distinct values) and `date_time` (TIMESTAMP), which is also the event time.
use arrow::array::{
    ArrayRef, DictionaryArray, Int64Array, StringArray, TimestampMillisecondArray, UInt8Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt8Type};
use arrow::record_batch::RecordBatch;
use std::sync::{Arc, OnceLock};

use freshet_engine::operator::{OperatorContext, Source, SourceOutput, SourceStatus};
use freshet_engine::{Result, TIME_COLUMN};
use freshet_operators::expr::timestamp_type;

use crate::SourcePlan;
use crate::registry::{SourceConnector, SourceContext};
use freshet_engine::operator::SubtaskInfo;
use freshet_job::Problems;

/// The Nexmark bid stream (deterministic from the seed).
#[derive(Debug, Clone, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NexmarkSettings {
    /// Number of bids.
    pub events: u64,
    /// Generator seed.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Events per millisecond of event time.
    #[serde(default = "default_epm")]
    pub events_per_ms: u64,
    /// Distinct bidders (100 000 in the shared benchmark; more for a large-state variant).
    #[serde(default = "default_bidders")]
    pub bidders: u64,
}

fn default_bidders() -> u64 {
    100_000
}
fn default_seed() -> u64 {
    42
}
fn default_epm() -> u64 {
    100
}

/// The `nexmark` source connector.
pub struct NexmarkConnector;

impl SourceConnector for NexmarkConnector {
    type Config = NexmarkSettings;

    fn kind(&self) -> &'static str {
        "nexmark"
    }

    fn plan(
        &self,
        ctx: &SourceContext<'_>,
        c: NexmarkSettings,
    ) -> std::result::Result<SourcePlan, Problems> {
        if !ctx.spec.schema.is_empty()
            || ctx
                .spec
                .event_time
                .as_deref()
                .is_some_and(|e| e != "date_time")
        {
            return Err(ctx.problem(
                "event_time",
                "the Nexmark source has a fixed schema with event time date_time",
            ));
        }
        if c.bidders == 0 {
            return Err(ctx.problem(
                "connector.bidders",
                "a Nexmark stream needs at least one bidder",
            ));
        }
        let batch_size = ctx.batch_size;
        Ok(SourcePlan::new(
            ctx,
            schema(),
            true,
            Arc::new(move |info: &SubtaskInfo| {
                Ok(Box::new(NexmarkSource::new(
                    c.events,
                    c.seed,
                    c.events_per_ms,
                    c.bidders,
                    info.index,
                    info.parallelism,
                    batch_size,
                )) as Box<dyn Source>)
            }),
        ))
    }
}

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
const BASE_TIME_MS: i64 = 1_700_000_000_000;
const CHANNELS: [&str; 4] = ["Google", "Facebook", "Baidu", "Apple"];

#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One bid, as plain numbers (the string columns as their code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bid {
    /// Auction id.
    pub auction: i64,
    /// Bidder id.
    pub bidder: i64,
    /// Price.
    pub price: i64,
    /// Channel code 0..4 (also selects the url).
    pub channel: u8,
    /// Extra code 0..8: 8 * code 'x' characters.
    pub extra: u8,
    /// Event time, epoch ms.
    pub date_time: i64,
}

/// Distinct bidders of the shared benchmark.
pub const BIDDERS: u64 = 100_000;

/// Bid number `i` of the stream, with `bidders` distinct bidders (at least 1).
#[inline]
pub fn bid(seed: u64, i: u64, events_per_ms: u64, bidders: u64) -> Bid {
    let a = mix64(seed.wrapping_add((2 * i + 1).wrapping_mul(GAMMA))) >> 1;
    let b = mix64(seed.wrapping_add((2 * i + 2).wrapping_mul(GAMMA))) >> 1;
    let auction = if a & 1 == 0 {
        1000 + ((a >> 1) % 100)
    } else {
        1000 + ((a >> 1) % 10_000)
    };
    Bid {
        auction: auction as i64,
        bidder: (1000 + ((b >> 8) % bidders.max(1))) as i64,
        price: (1 + ((b >> 32) % 10_000)) as i64,
        channel: (b & 3) as u8,
        extra: ((b >> 2) & 7) as u8,
        date_time: BASE_TIME_MS + (i / events_per_ms) as i64 - ((a >> 50) % 500) as i64,
    }
}

/// The bid schema (with the time column).
pub fn schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        let dict = DataType::Dictionary(Box::new(DataType::UInt8), Box::new(DataType::Utf8));
        Arc::new(Schema::new(vec![
            Field::new("auction", DataType::Int64, false),
            Field::new("bidder", DataType::Int64, false),
            Field::new("price", DataType::Int64, false),
            Field::new("channel", dict.clone(), false),
            Field::new("url", dict.clone(), false),
            Field::new("extra", dict, false),
            Field::new("date_time", timestamp_type(), false),
            Field::new(TIME_COLUMN, DataType::Int64, false),
        ]))
    })
    .clone()
}

struct Dictionaries {
    channels: ArrayRef,
    urls: ArrayRef,
    extras: ArrayRef,
}

fn dictionaries() -> &'static Dictionaries {
    static D: OnceLock<Dictionaries> = OnceLock::new();
    D.get_or_init(|| Dictionaries {
        channels: Arc::new(StringArray::from(CHANNELS.to_vec())),
        urls: Arc::new(StringArray::from_iter_values((0..4).map(|c| {
            format!("https://www.nexmark.com/item.htm?query=1&channel_id={c}")
        }))),
        extras: Arc::new(StringArray::from_iter_values(
            (0..8).map(|k| "x".repeat(8 * k)),
        )),
    })
}

/// One Nexmark generator subtask.
pub struct NexmarkSource {
    seed: u64,
    events_per_ms: u64,
    bidders: u64,
    index: u64,
    parallelism: u64,
    per_subtask: u64,
    next: u64,
    batch_size: usize,
}

impl NexmarkSource {
    /// Subtask `index` of `parallelism` of a stream of `events` bids by `bidders` bidders.
    pub fn new(
        events: u64,
        seed: u64,
        events_per_ms: u64,
        bidders: u64,
        index: u32,
        parallelism: u32,
        batch_size: usize,
    ) -> Self {
        let p = parallelism as u64;
        NexmarkSource {
            seed,
            events_per_ms: events_per_ms.max(1),
            bidders: bidders.max(1),
            index: index as u64,
            parallelism: p,
            per_subtask: events / p,
            next: 0,
            batch_size,
        }
    }
}

impl Source for NexmarkSource {
    fn open(&mut self, state: &mut freshet_engine::checkpoint::StateContext<'_>) -> Result<()> {
        if let Some(p) = crate::generator::restore_position(state, "a Nexmark source")? {
            self.next = p;
        }
        Ok(())
    }

    fn snapshot(
        &mut self,
        snap: &mut freshet_engine::checkpoint::SnapshotContext<'_>,
    ) -> Result<()> {
        snap.put_fixed(crate::generator::POSITION, self.next.to_be_bytes().to_vec());
        Ok(())
    }

    fn poll(
        &mut self,
        _: &OperatorContext<'_>,
        out: &mut dyn SourceOutput,
    ) -> Result<SourceStatus> {
        if self.next >= self.per_subtask {
            return Ok(SourceStatus::Finished);
        }
        let n = (self.batch_size as u64).min(self.per_subtask - self.next) as usize;
        let (mut auction, mut bidder, mut price) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut channel, mut extra, mut time) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for k in self.next..self.next + n as u64 {
            let b = bid(
                self.seed,
                k * self.parallelism + self.index,
                self.events_per_ms,
                self.bidders,
            );
            auction.push(b.auction);
            bidder.push(b.bidder);
            price.push(b.price);
            channel.push(b.channel);
            extra.push(b.extra);
            time.push(b.date_time);
        }
        self.next += n as u64;
        let d = dictionaries();
        let channel = UInt8Array::from(channel);
        let dict = |keys: &UInt8Array, values: &ArrayRef| -> Result<ArrayRef> {
            Ok(Arc::new(DictionaryArray::<UInt8Type>::try_new(
                keys.clone(),
                values.clone(),
            )?))
        };
        let times = Int64Array::from(time);
        let cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(auction)),
            Arc::new(Int64Array::from(bidder)),
            Arc::new(Int64Array::from(price)),
            dict(&channel, &d.channels)?,
            dict(&channel, &d.urls)?,
            dict(&UInt8Array::from(extra), &d.extras)?,
            Arc::new(TimestampMillisecondArray::new(times.values().clone(), None)),
            Arc::new(times),
        ];
        out.emit(RecordBatch::try_new(schema(), cols)?);
        Ok(SourceStatus::Ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_generator() {
        // bid 0 and 1 as published with the reference benchmark
        let b0 = bid(42, 0, 100, BIDDERS);
        assert_eq!(
            (
                b0.auction,
                b0.bidder,
                b0.price,
                b0.channel,
                b0.extra,
                b0.date_time
            ),
            (1053, 86336, 4954, 1, 0, 1_699_999_999_926)
        );
        let b1 = bid(42, 1, 100, BIDDERS);
        assert_eq!(
            (
                b1.auction,
                b1.bidder,
                b1.price,
                b1.channel,
                b1.extra * 8,
                b1.date_time
            ),
            (1964, 42905, 3936, 2, 16, 1_699_999_999_718)
        );
    }

    /// With more bidders, each bid keeps everything but its bidder, whose id agrees with the
    /// shared stream's modulo 100 000 (which divides 10 000 000) and spreads over the larger
    /// range.
    #[test]
    fn more_bidders_change_only_the_bidder() {
        let n = 10_000_000;
        let mut beyond = 0;
        for i in 0..10_000 {
            let (small, large) = (bid(42, i, 100, BIDDERS), bid(42, i, 100, n));
            assert_eq!(
                (small.bidder - 1000) as u64,
                (large.bidder - 1000) as u64 % BIDDERS,
                "bid {i}"
            );
            assert!((1000..1000 + n as i64).contains(&large.bidder));
            beyond += usize::from(large.bidder >= 1000 + BIDDERS as i64);
            assert_eq!(
                Bid {
                    bidder: small.bidder,
                    ..large
                },
                small
            );
        }
        assert!(beyond > 9_000, "{beyond} of 10 000 bidders above 100 000");
    }
}
