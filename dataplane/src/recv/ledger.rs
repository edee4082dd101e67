//! What a receiving session knows of its object, free of I/O: the chunks placed (offset, length,
//! checksum), the ranges they cover, what this run received and what a resume found; the journal
//! records a placement owes; and a commit's verdict against them. The receiver's coordinator and
//! storage workers perform what it says (journal writes, syncs, publication); the simulation
//! tests (`dataplane/tests/simulation.rs`) drive it with seeded loss, duplication, reordering,
//! crashes and full disks.

use std::collections::BTreeMap;

use crate::session::{JournalRecord, RangeSet};
use crate::wire::{self, Commit, ErrorCode, ManifestDigest};

/// A refusal: the code the sender is told and the message.
pub type Refusal = (ErrorCode, String);

/// The ledger of one session's object.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    size: Option<u64>,
    records: BTreeMap<u64, (u32, u64)>,
    have: RangeSet,
    received: u64,
    resumed: u64,
    journaling: bool,
    pending: Vec<u8>,
    committed: bool,
}

impl Ledger {
    /// The ledger of an object of `size` bytes (`None`: a stream of unknown size).
    pub fn new(size: Option<u64>) -> Self {
        Self { size, ..Self::default() }
    }

    /// Restores a resumed session's chunks from its journal's `records`, keeping only those
    /// inside the object, no longer than `chunk_size`, and whose bytes `read` returns with the
    /// journaled checksum: nothing unverified is trusted. Returns the bytes restored.
    pub fn restore(&mut self, records: impl IntoIterator<Item = JournalRecord>, chunk_size: u32, mut read: impl FnMut(u64, u32) -> Option<Vec<u8>>) -> u64 {
        for r in records {
            let inside = self.size.is_some_and(|sz| r.offset.checked_add(u64::from(r.len)).is_some_and(|end| end <= sz));
            if r.len == 0 || r.len > chunk_size || !inside {
                continue;
            }
            if read(r.offset, r.len).is_some_and(|b| b.len() == r.len as usize && wire::checksum(&b) == r.sum) {
                self.records.insert(r.offset, (r.len, r.sum));
                self.have.insert(r.offset, r.offset + u64::from(r.len));
            }
        }
        self.resumed = self.have.covered();
        self.resumed
    }

    /// The journal records of every chunk held (a resumed session's fresh journal).
    pub fn journal(&self) -> impl Iterator<Item = JournalRecord> + '_ {
        self.records.iter().map(|(&offset, &(len, sum))| JournalRecord { offset, len, sum })
    }

    /// From now on each placement queues its journal record (a session with a journal file).
    pub fn start_journal(&mut self) {
        self.journaling = true;
    }

    /// A chunk was placed (written where it belongs, or rebuilt and written): recorded, and its
    /// journal record queued when journaling. Returns whether it was new (a chunk placed again
    /// counts once).
    pub fn place(&mut self, offset: u64, len: u32, sum: u64) -> bool {
        let new = self.records.insert(offset, (len, sum)).is_none();
        if new {
            self.received += u64::from(len);
        }
        self.have.insert(offset, offset + u64::from(len));
        if self.journaling {
            self.pending.extend_from_slice(&JournalRecord { offset, len, sum }.encode());
        }
        new
    }

    /// Whether the chunk at `offset` is placed.
    pub fn placed(&self, offset: u64) -> bool {
        self.records.contains_key(&offset)
    }

    /// Journal records queued since the last take, encoded.
    pub fn pending_journal(&self) -> usize {
        self.pending.len()
    }

    /// Takes the queued journal bytes (to append to the journal file).
    pub fn take_journal(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    /// The ranges held (a Welcome's resume list).
    pub fn have(&self) -> &RangeSet {
        &self.have
    }

    /// Bytes received in this run (a chunk placed twice counts once).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Bytes a resume found already present and verified.
    pub fn resumed(&self) -> u64 {
        self.resumed
    }

    /// The object's size, when known.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// Whether `commit` declares the size the session opened with (when it opened with one).
    pub fn check_size(&self, commit: &Commit) -> Result<(), Refusal> {
        match self.size {
            Some(sz) if sz != commit.size => Err((ErrorCode::DigestMismatch, format!("commit declares {} bytes but the session opened with {sz}", commit.size))),
            _ => Ok(()),
        }
    }

    /// The verdict on `commit` from what was placed: the whole-object digest over the placed
    /// chunks' checksums when every byte of the declared size is covered and the size is the
    /// one the session opened with; a refusal naming what is wrong otherwise. A ledger gives at
    /// most one verdict: a second commit is refused (a session publishes at most once). The
    /// caller still compares the digest with the commit's, after whatever it rebuilt (HDE)
    /// adds to it.
    pub fn verdict(&mut self, commit: &Commit) -> Result<[u8; 32], Refusal> {
        if std::mem::replace(&mut self.committed, true) {
            return Err((ErrorCode::Refused, "this session already committed".into()));
        }
        self.check_size(commit)?;
        let mut m = ManifestDigest::default();
        for (&o, &(l, s)) in &self.records {
            m.add(o, l, s);
        }
        m.finish(commit.size).map_err(|e| (ErrorCode::DigestMismatch, format!("commit before the object is complete: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(size: u64, chunks: &[&[u8]]) -> Commit {
        let mut m = ManifestDigest::default();
        let mut at = 0;
        for c in chunks {
            m.add(at, c.len() as u32, wire::checksum(c));
            at += c.len() as u64;
        }
        Commit { size, digest: m.finish(size).unwrap() }
    }

    #[test]
    fn a_complete_object_verifies_once_and_an_incomplete_one_is_named() {
        let (a, b) = (vec![1u8; 100], vec![2u8; 50]);
        let c = commit(150, &[&a, &b]);
        let mut l = Ledger::new(Some(150));
        assert!(l.place(0, 100, wire::checksum(&a)));
        assert!(!l.place(0, 100, wire::checksum(&a)), "a chunk placed again counts once");
        assert_eq!(l.received(), 100);
        let e = l.clone().verdict(&c).unwrap_err();
        assert!(e.1.contains("before the object is complete"), "{e:?}");
        l.place(100, 50, wire::checksum(&b));
        assert_eq!(l.verdict(&c).unwrap(), c.digest);
        assert!(l.verdict(&c).unwrap_err().1.contains("already committed"), "at most one verdict");
        let mut l = Ledger::new(Some(150));
        assert!(l.verdict(&Commit { size: 149, digest: c.digest }).unwrap_err().1.contains("opened with 150"));
    }

    #[test]
    fn a_restore_trusts_only_chunks_whose_bytes_check_out() {
        let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let rec = |o: u64, l: u32, sum: u64| JournalRecord { offset: o, len: l, sum };
        let good = |o: usize, l: usize| wire::checksum(&data[o..o + l]);
        let recs = [
            rec(0, 100, good(0, 100)),
            rec(100, 100, good(100, 100) ^ 1), // the bytes changed since
            rec(200, 100, good(200, 100)),
            rec(250, 100, 0),   // past the end
            rec(0, 0, 0),       // empty
            rec(50, 4096, 0),   // longer than a chunk
        ];
        let mut l = Ledger::new(Some(300));
        let n = l.restore(recs, 128, |o, len| data.get(o as usize..o as usize + len as usize).map(<[u8]>::to_vec));
        assert_eq!(n, 200);
        assert_eq!(l.have().ranges(), vec![(0, 100), (200, 300)]);
        assert_eq!((l.resumed(), l.received()), (200, 0));
        assert_eq!(l.journal().count(), 2);
    }
}
