//! Fuzzes the standard-output reorder buffer with arrivals a peer chooses (offsets, lengths,
//! duplicates, a gap never filled): it must never hold more than its hard limit, and what leaves
//! leaves in offset order without overlap.
#![no_main]

use dataplane::recv::reorder::{Arrival, Reorder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cap = 4096;
    let mut r: Reorder<u8> = Reorder::new(cap);
    let mut next = 0u64;
    for op in data.chunks_exact(3) {
        let offset = u64::from(u16::from_le_bytes([op[0], op[1]])) * 16;
        let len = usize::from(op[2]) * 8;
        let _ = r.arrive(offset, vec![0; len], 0, op[2]);
        while let Some((off, h)) = r.pop() {
            assert_eq!(off, next);
            next += h.data.len() as u64;
        }
        assert!(r.held_bytes() <= cap * 5 + 255 * 8);
    }
    let _ = Arrival::Full;
});
