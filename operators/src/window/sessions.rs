//! A key's open session windows as the session table's cache holds them: encoded, exactly as
//! their row stores them (postcard), and decoded only while a record or a firing works on them.
//!
//! Decoded, a key's set is a 96-byte value (a session's accumulators inline) and its entry in
//! the table's map 168 bytes; encoded, a set of one session of a few numeric accumulators takes
//! about 16 bytes, held inline in a 32-byte value, and the entry 104. The same budget holds
//! more keys' sessions before it evicts, and decoding a set costs far less than reading an
//! evicted one back from RocksDB.
use serde::de::Error as _;
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smallvec::SmallVec;

use freshet_engine::{EngineError, Result};

use super::aggregate::Accs;

/// Accumulators of one session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Session {
    pub(super) end: i64,
    pub(super) accs: Accs,
}

/// A key's open sessions as (start, session), in start order: the value of one row per key.
/// A record must read every session it may bridge, and a key rarely has more than one open,
/// so the set is the unit read and written (a point lookup, batched over a batch's keys).
pub(super) type Sessions = SmallVec<[(i64, Session); 1]>;

/// A key's [`Sessions`], encoded. Its serde form is the decoded set's, so rows written before
/// sets were held encoded read back unchanged, and a row is the same either way.
#[derive(Debug, Clone, Default)]
pub(super) struct SessionSet(SmallVec<[u8; 24]>);

impl SessionSet {
    /// Encodes `set`.
    pub(super) fn encode(set: &Sessions) -> Result<Self> {
        postcard::to_extend(set, SmallVec::new())
            .map(SessionSet)
            .map_err(|e| EngineError::State(format!("encoding a key's sessions: {e}")))
    }

    /// The sessions encoded here.
    pub(super) fn decode(&self) -> Result<Sessions> {
        postcard::from_bytes(&self.0)
            .map_err(|e| EngineError::State(format!("decoding a key's sessions: {e}")))
    }
}

impl Serialize for SessionSet {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.decode().map_err(S::Error::custom)?.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SessionSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        SessionSet::encode(&Sessions::deserialize(d)?).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::aggregate::Acc;

    fn set(sessions: &[(i64, i64, i64)]) -> Sessions {
        sessions
            .iter()
            .map(|&(start, end, n)| {
                let accs = smallvec::smallvec![Acc::Count(n), Acc::SumInt(-n, true)];
                (start, Session { end, accs })
            })
            .collect()
    }

    fn parts(set: &Sessions) -> Vec<(i64, i64, Vec<Acc>)> {
        set.iter()
            .map(|(start, s)| (*start, s.end, s.accs.to_vec()))
            .collect()
    }

    /// A row written from a decoded set reads back as an encoded one and the other way round,
    /// byte for byte; a count's set stays inline.
    #[test]
    fn an_encoded_set_is_written_and_read_as_the_decoded_one() {
        let t = 1_714_557_600_000;
        for sessions in [
            set(&[]),
            set(&[(t, t + 86_400_000_000, 2)]),
            set(&[(t, t + 10, 1), (t + 30, t + 45, 7), (t + 90, t + 91, 300)]),
        ] {
            let row = postcard::to_allocvec(&sessions).unwrap();
            let held: SessionSet = postcard::from_bytes(&row).unwrap();
            assert_eq!(parts(&held.decode().unwrap()), parts(&sessions));
            assert_eq!(postcard::to_allocvec(&held).unwrap(), row);
            assert_eq!(
                held.0.spilled(),
                row.len() > 24,
                "{} bytes held inline up to 24",
                row.len()
            );
        }
        let one: Sessions = [(
            t,
            Session {
                end: t + 86_400_000_000,
                accs: smallvec::smallvec![Acc::Count(2)],
            },
        )]
        .into_iter()
        .collect();
        assert!(!SessionSet::encode(&one).unwrap().0.spilled());
        assert!(SessionSet(SmallVec::from_slice(&[3, 1])).decode().is_err());
    }
}
