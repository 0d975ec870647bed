//! Blocks of pane values: a spill writes the values of many keys of one namespace as one
//! RocksDB row (see [`super::panes`]), so spilling and reading a large pane cost a put and a
//! read per block rather than per key.
//!
//! A block is `[version: 0]` followed by its entries in key order, each
//! `[order length: LEB128][key order][value length: LEB128][value]`, where the value is a pane
//! row's value (its own encoding version, then the value). A block never holds keys of two key
//! groups, so a restore at another parallelism keeps or drops it whole by the key group of its
//! first key, which its row key carries.
use crate::{EngineError, Result};

/// Keys per block at most.
const BLOCK_KEYS: usize = 512;

/// A block is closed after the entry that takes it past this many bytes.
const BLOCK_BYTES: usize = 32 << 10;

/// The encoding version of blocks this version writes and reads.
const VERSION: u8 = 0;

/// Builds blocks from entries given in key order.
#[derive(Debug, Default)]
pub(crate) struct BlockWriter {
    buf: Vec<u8>,
    first: Vec<u8>,
    keys: usize,
}

impl BlockWriter {
    /// Whether an entry of key order `order` must start a new block: this one is full, or
    /// holds another key group.
    pub(crate) fn must_close_before(&self, order: &[u8]) -> bool {
        self.keys > 0
            && (self.keys >= BLOCK_KEYS
                || self.buf.len() >= BLOCK_BYTES
                || order.get(..2) != self.first.get(..2))
    }

    /// Adds an entry (in key order, after every entry already in the block).
    pub(crate) fn push(&mut self, order: &[u8], value: &[u8]) {
        if self.keys == 0 {
            self.buf.clear();
            self.buf.push(VERSION);
            self.first.clear();
            self.first.extend_from_slice(order);
        }
        push_framed(&mut self.buf, order);
        push_framed(&mut self.buf, value);
        self.keys += 1;
    }

    /// The block built so far as (key order of its first entry, block), if it holds any entry;
    /// the writer starts a new one.
    pub(crate) fn take(&mut self) -> Option<(&[u8], &[u8])> {
        if self.keys == 0 {
            return None;
        }
        self.keys = 0;
        Some((&self.first, &self.buf))
    }
}

fn push_framed(buf: &mut Vec<u8>, bytes: &[u8]) {
    let (len, n) = super::backend::leb128(bytes.len());
    buf.extend_from_slice(&len[..n]);
    buf.extend_from_slice(bytes);
}

/// Where a block's entries lie in it: (key order, value) as byte ranges, in key order.
pub(crate) type Entries = Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>;

/// Where each entry of `block` lies in it.
pub(crate) fn entries(block: &[u8]) -> Result<Entries> {
    let bad = |what: &str| EngineError::StateStore {
        message: format!("a pane block of {} bytes: {what}", block.len()),
        retryable: false,
    };
    match block.first() {
        Some(&VERSION) => {}
        Some(v) => {
            return Err(bad(&format!(
                "encoding version {v}, written by a newer version than this one, which reads version {VERSION}"
            )));
        }
        None => return Err(bad("empty")),
    }
    let mut out = Vec::new();
    let mut at = 1;
    while at < block.len() {
        let order = framed(block, &mut at).ok_or_else(|| bad("a cut key"))?;
        let value = framed(block, &mut at).ok_or_else(|| bad("a cut value"))?;
        out.push((order, value));
    }
    Ok(out)
}

/// The range of the framed bytes at `*at`, moving `at` past them.
fn framed(block: &[u8], at: &mut usize) -> Option<std::ops::Range<usize>> {
    let mut len = 0usize;
    for i in 0..5 {
        let b = *block.get(*at + i)?;
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            let start = *at + i + 1;
            let end = start.checked_add(len).filter(|e| *e <= block.len())?;
            *at = end;
            return Some(start..end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(kg: u16, key: &[u8]) -> Vec<u8> {
        let mut o = kg.to_be_bytes().to_vec();
        o.push(key.len() as u8);
        o.extend_from_slice(key);
        o
    }

    /// Blocks hold their entries in order, are cut by size and by key group, and a damaged or
    /// newer block is an error, not a panic.
    #[test]
    fn blocks_round_trip_and_are_cut_by_key_group_and_size() {
        let mut w = BlockWriter::default();
        let mut blocks: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut want: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for kg in 0..3u16 {
            for i in 0..700u32 {
                let o = order(kg, format!("k{i:05}").as_bytes());
                let v = vec![0u8; (i % 300) as usize];
                if w.must_close_before(&o)
                    && let Some((f, b)) = w.take()
                {
                    blocks.push((f.to_vec(), b.to_vec()));
                }
                w.push(&o, &v);
                want.push((o, v));
            }
        }
        if let Some((f, b)) = w.take() {
            blocks.push((f.to_vec(), b.to_vec()));
        }
        assert!(w.take().is_none());
        let mut got = Vec::new();
        for (first, block) in &blocks {
            let es = entries(block).unwrap();
            assert!(!es.is_empty() && es.len() <= BLOCK_KEYS);
            assert_eq!(&block[es[0].0.clone()], first.as_slice());
            assert!(
                es.iter().all(|(o, _)| block[o.clone()][..2] == first[..2]),
                "one key group per block"
            );
            got.extend(
                es.iter()
                    .map(|(o, v)| (block[o.clone()].to_vec(), block[v.clone()].to_vec())),
            );
        }
        assert_eq!(got, want);
        assert!(
            blocks.len() > 6,
            "cut by size and key group: {}",
            blocks.len()
        );
        let (_, block) = &blocks[0];
        assert!(entries(&block[..block.len() - 1]).is_err());
        let mut newer = block.clone();
        newer[0] = 1;
        let err = entries(&newer).unwrap_err().to_string();
        assert!(err.contains("newer version"), "{err}");
        assert!(entries(&[]).is_err());
    }
}
