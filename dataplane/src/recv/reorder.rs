//! The reorder buffer of a stream written to standard output: chunks arrive on many streams in
//! any order and leave in offset order. Free of I/O.
//!
//! A chunk ahead of a gap is acknowledged on arrival while the buffer has room, so the gap's
//! stream repairs its loss while the other streams' windows keep moving; acknowledging only
//! what is written in order would stall every stream behind any one loss. Beyond the cap,
//! acknowledgements wait for the write, which bounds the buffer. The session holds what it
//! acknowledged: a stream that dies loses nothing.

use std::collections::BTreeMap;

/// Chunks held in offset order until the gap before them is filled.
#[derive(Debug)]
pub struct Reorder<A> {
    next: u64,
    held: BTreeMap<u64, Held<A>>,
    bytes: usize,
    cap: usize,
}

/// A chunk ready to be written: the acknowledgement is still owed to `ack` if it is `Some`.
#[derive(Debug, PartialEq, Eq)]
pub struct Held<A> {
    pub data: Vec<u8>,
    pub sum: u64,
    pub ack: Option<A>,
}

/// What to do with a chunk that arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Behind what was already written (a re-sent chunk): acknowledge it, nothing else.
    Stale,
    /// Held and acknowledged now.
    AckedNow,
    /// Held; acknowledged once written.
    AckOnWrite,
    /// Not held: the buffer holds its hard limit (a peer sending ever further ahead of a gap it
    /// never fills). The session fails.
    Full,
}

/// Bytes held beyond the cap, not acknowledged, before arrivals are refused: more than the
/// streams' windows can put in flight (64 streams of 8 chunks of 1 MiB... and then some).
const OVER_CAP: usize = 1 << 30;

impl<A> Reorder<A> {
    /// An empty buffer expecting offset 0, holding up to `cap` bytes acknowledged early.
    pub fn new(cap: usize) -> Self {
        Self { next: 0, held: BTreeMap::new(), bytes: 0, cap }
    }

    /// Takes a chunk that arrived from `from`.
    pub fn arrive(&mut self, offset: u64, data: Vec<u8>, sum: u64, from: A) -> Arrival {
        if offset < self.next {
            return Arrival::Stale;
        }
        if self.bytes + data.len() > self.cap.saturating_add(OVER_CAP.min(self.cap.saturating_mul(4))) && offset != self.next {
            return Arrival::Full;
        }
        // The next chunk in order is written at once: acknowledged then.
        let early = offset > self.next && self.bytes + data.len() <= self.cap;
        self.bytes += data.len();
        let held = Held { data, sum, ack: (!early).then_some(from) };
        if let Some(old) = self.held.insert(offset, held) {
            self.bytes -= old.data.len();
        }
        if early { Arrival::AckedNow } else { Arrival::AckOnWrite }
    }

    /// The next chunk in offset order, if it is here; the caller writes it.
    pub fn pop(&mut self) -> Option<(u64, Held<A>)> {
        let e = self.held.first_entry()?;
        if *e.key() != self.next {
            return None;
        }
        let (off, h) = e.remove_entry();
        self.bytes -= h.data.len();
        self.next += h.data.len() as u64;
        Some((off, h))
    }

    /// The offset written next.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Bytes held.
    pub fn held_bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: usize) -> Vec<u8> {
        vec![n; len]
    }

    #[test]
    fn chunks_ahead_of_a_gap_are_acknowledged_at_once_and_leave_in_order() {
        let mut r = Reorder::new(1 << 20);
        // Chunk 0 (stream 0) is late; 1 and 2 arrive on other streams.
        assert_eq!(r.arrive(10, chunk(1, 10), 1, 1), Arrival::AckedNow);
        assert_eq!(r.arrive(20, chunk(2, 10), 2, 2), Arrival::AckedNow);
        assert!(r.pop().is_none(), "nothing leaves before the gap is filled");
        assert_eq!(r.arrive(0, chunk(0, 10), 0, 0), Arrival::AckOnWrite);
        let out: Vec<(u64, u8, Option<i32>)> = std::iter::from_fn(|| r.pop()).map(|(o, h)| (o, h.data[0], h.ack)).collect();
        assert_eq!(out, vec![(0, 0, Some(0)), (10, 1, None), (20, 2, None)]);
        assert_eq!(r.held_bytes(), 0);
        assert_eq!(r.arrive(5, chunk(9, 5), 9, 3), Arrival::Stale);
    }

    #[test]
    fn beyond_the_cap_acknowledgements_wait_for_the_write() {
        let mut r = Reorder::new(25);
        assert_eq!(r.arrive(10, chunk(1, 10), 1, 1), Arrival::AckedNow);
        assert_eq!(r.arrive(20, chunk(2, 10), 2, 2), Arrival::AckedNow);
        // 30 bytes would exceed the cap of 25: held, but its stream's window stays shut.
        assert_eq!(r.arrive(30, chunk(3, 10), 3, 3), Arrival::AckOnWrite);
        assert_eq!(r.arrive(0, chunk(0, 10), 0, 0), Arrival::AckOnWrite);
        let acks: Vec<Option<i32>> = std::iter::from_fn(|| r.pop()).map(|(_, h)| h.ack).collect();
        assert_eq!(acks, vec![Some(0), None, None, Some(3)]);
    }

    #[test]
    fn a_chunk_sent_twice_is_held_once() {
        let mut r = Reorder::new(1 << 20);
        r.arrive(10, chunk(1, 10), 1, 1);
        r.arrive(10, chunk(1, 10), 1, 2);
        assert_eq!(r.held_bytes(), 10);
        r.arrive(0, chunk(0, 10), 0, 0);
        assert_eq!(std::iter::from_fn(|| r.pop()).count(), 2);
    }

    #[test]
    fn a_gap_never_filled_does_not_grow_the_buffer_past_its_hard_limit() {
        let mut r = Reorder::new(100);
        let mut held = 0;
        for k in 1..1000u64 {
            match r.arrive(k * 10, chunk(1, 10), 1, 1) {
                Arrival::Full => break,
                _ => held += 1,
            }
        }
        assert_eq!(held, 50, "cap 100 plus four times it, in 10-byte chunks");
        assert!(r.held_bytes() <= 500);
        // The next chunk in order is still taken: it drains the buffer.
        assert_eq!(r.arrive(0, chunk(0, 10), 0, 0), Arrival::AckOnWrite);
        assert_eq!(std::iter::from_fn(|| r.pop()).count(), 51);
    }
}
