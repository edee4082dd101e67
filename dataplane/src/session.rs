//! Session bookkeeping free of I/O: received ranges, the resume journal's byte format, chunk
//! planning and the default stream count. The runtime (`send`, `recv`) performs what these decide.

use std::collections::BTreeMap;
use std::time::Duration;

use xxhash_rust::xxh3::xxh3_64;

/// A set of disjoint half-open byte ranges, merged on insert (the shape of quinn's `RangeSet`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RangeSet {
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// Inserts `[start, end)`, merging with neighbours.
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if end <= start {
            return;
        }
        if let Some((&s, &e)) = self.map.range(..=start).next_back()
            && e >= start
        {
            start = s;
            end = end.max(e);
            self.map.remove(&s);
        }
        while let Some((&s, &e)) = self.map.range(start..).next() {
            if s > end {
                break;
            }
            end = end.max(e);
            self.map.remove(&s);
        }
        self.map.insert(start, end);
    }
    /// Whether `[start, end)` is wholly inside the set.
    pub fn contains(&self, start: u64, end: u64) -> bool {
        matches!(self.map.range(..=start).next_back(), Some((_, &e)) if e >= end)
    }
    /// Total bytes covered.
    pub fn covered(&self) -> u64 {
        self.map.iter().map(|(s, e)| e - s).sum()
    }
    /// The ranges in order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.map.iter().map(|(&s, &e)| (s, e)).collect()
    }
    /// Whether the set is exactly `[0, size)` (or empty for size 0).
    pub fn is_complete(&self, size: u64) -> bool {
        size == 0 || (self.map.len() == 1 && self.map.get(&0) == Some(&size))
    }
}

/// Splits an object of `size` bytes into chunks of `chunk` bytes, skipping those wholly inside
/// `have`. Returns `(offset, len)` pairs in offset order.
pub fn plan_chunks(size: u64, chunk: u32, have: &RangeSet) -> Vec<(u64, u32)> {
    let c = u64::from(chunk);
    let mut out = Vec::with_capacity(size.div_ceil(c) as usize);
    let mut off = 0;
    while off < size {
        let len = c.min(size - off);
        if !have.contains(off, off + len) {
            out.push((off, len as u32));
        }
        off += len;
    }
    out
}

/// Default stream count from cores and measured RTT.
///
/// On a short path one stream per core already saturates the CPU, so extra streams only add
/// context switches; with distance each stream's window is limited by loss recovery and slow
/// start, so streams are added with RTT (one per 10 ms) to keep the aggregate window open, as
/// GridFTP-style tools do. Bounded to [2, 32].
pub fn default_streams(cores: usize, rtt: Duration) -> u16 {
    let base = cores.max(2) as u64;
    let by_rtt = (rtt.as_micros() as u64) / 10_000;
    (base + by_rtt).clamp(2, 32) as u16
}

/// Journal header magic.
pub const JOURNAL_MAGIC: [u8; 8] = *b"DWCPJNL1";
/// Journal header length.
pub const JOURNAL_HEADER_LEN: usize = 32;
/// Journal record length.
pub const JOURNAL_RECORD_LEN: usize = 24;

/// The identity a journal is bound to: a journal for another object or chunk size is discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalHeader {
    /// Object size.
    pub object_size: u64,
    /// Object identity from the sender's Hello.
    pub object_id: u64,
    /// Chunk size.
    pub chunk_size: u32,
}

/// One placed chunk: where, how long, and the XXH3-64 of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalRecord {
    /// Object offset.
    pub offset: u64,
    /// Length.
    pub len: u32,
    /// Checksum of the bytes.
    pub sum: u64,
}

impl JournalHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; JOURNAL_HEADER_LEN] {
        let mut b = [0u8; JOURNAL_HEADER_LEN];
        b[..8].copy_from_slice(&JOURNAL_MAGIC);
        b[8..16].copy_from_slice(&self.object_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.object_id.to_le_bytes());
        b[24..28].copy_from_slice(&self.chunk_size.to_le_bytes());
        let c = xxh3_64(&b[..28]) as u32;
        b[28..].copy_from_slice(&c.to_le_bytes());
        b
    }
}

impl JournalRecord {
    /// Encodes a record.
    pub fn encode(&self) -> [u8; JOURNAL_RECORD_LEN] {
        let mut b = [0u8; JOURNAL_RECORD_LEN];
        b[..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..20].copy_from_slice(&self.sum.to_le_bytes());
        let c = xxh3_64(&b[..20]) as u32;
        b[20..].copy_from_slice(&c.to_le_bytes());
        b
    }
}

/// Parses a journal. Returns `None` when the header is missing or damaged; a torn or damaged
/// record ends the list (everything after it is ignored and will be re-sent).
pub fn parse_journal(b: &[u8]) -> Option<(JournalHeader, Vec<JournalRecord>)> {
    if b.len() < JOURNAL_HEADER_LEN || b[..8] != JOURNAL_MAGIC {
        return None;
    }
    let c = u32::from_le_bytes(b[28..32].try_into().ok()?);
    if c != xxh3_64(&b[..28]) as u32 {
        return None;
    }
    let h = JournalHeader {
        object_size: u64::from_le_bytes(b[8..16].try_into().ok()?),
        object_id: u64::from_le_bytes(b[16..24].try_into().ok()?),
        chunk_size: u32::from_le_bytes(b[24..28].try_into().ok()?),
    };
    let mut recs = Vec::new();
    for r in b[JOURNAL_HEADER_LEN..].chunks_exact(JOURNAL_RECORD_LEN) {
        let c = u32::from_le_bytes(r[20..24].try_into().ok()?);
        if c != xxh3_64(&r[..20]) as u32 {
            break;
        }
        recs.push(JournalRecord {
            offset: u64::from_le_bytes(r[..8].try_into().ok()?),
            len: u32::from_le_bytes(r[8..12].try_into().ok()?),
            sum: u64::from_le_bytes(r[12..20].try_into().ok()?),
        });
    }
    Some((h, recs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rangeset_merges() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        r.insert(20, 30);
        assert_eq!(r.ranges(), vec![(10, 40)]);
        r.insert(0, 5);
        assert!(r.contains(12, 40));
        assert!(!r.contains(4, 11));
        assert_eq!(r.covered(), 35);
        assert!(!r.is_complete(40));
        r.insert(5, 10);
        assert!(r.is_complete(40));
    }

    #[test]
    fn plan_skips_held_chunks() {
        let mut have = RangeSet::default();
        have.insert(0, 200);
        let p = plan_chunks(350, 100, &have);
        assert_eq!(p, vec![(200, 100), (300, 50)]);
    }

    #[test]
    fn streams_grow_with_rtt() {
        assert_eq!(default_streams(2, Duration::from_micros(50)), 2);
        assert_eq!(default_streams(2, Duration::from_millis(50)), 7);
        assert_eq!(default_streams(64, Duration::from_millis(500)), 32);
    }

    #[test]
    fn journal_torn_tail_ignored() {
        let h = JournalHeader { object_size: 100, object_id: 7, chunk_size: 10 };
        let mut b = h.encode().to_vec();
        for i in 0..3 {
            b.extend_from_slice(&JournalRecord { offset: i * 10, len: 10, sum: i }.encode());
        }
        b.extend_from_slice(&[1, 2, 3]);
        let (h2, recs) = parse_journal(&b).unwrap();
        assert_eq!(h2, h);
        assert_eq!(recs.len(), 3);
        let n = b.len();
        b[n - 1] ^= 0xff; // damage inside the torn tail: still three
        assert_eq!(parse_journal(&b).unwrap().1.len(), 3);
        b[JOURNAL_HEADER_LEN + 30] ^= 1; // damage record 1: only record 0 survives
        assert_eq!(parse_journal(&b).unwrap().1.len(), 1);
        b[3] ^= 1;
        assert!(parse_journal(&b).is_none());
    }

    proptest! {
        #[test]
        fn rangeset_matches_bitmap(ops in prop::collection::vec((0u64..200, 0u64..50), 0..40)) {
            let mut r = RangeSet::default();
            let mut bits = [false; 256];
            for (s, l) in ops {
                r.insert(s, s + l);
                for b in &mut bits[s as usize..(s + l) as usize] { *b = true; }
            }
            prop_assert_eq!(r.covered(), bits.iter().filter(|b| **b).count() as u64);
            let rs = r.ranges();
            for w in rs.windows(2) { prop_assert!(w[0].1 < w[1].0); }
            for (s, e) in rs { for i in s..e { prop_assert!(bits[i as usize]); } }
        }
    }
}
