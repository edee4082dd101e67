//! Fuzzes the HDE frame decoder and the page store it writes: the first byte picks the store
//! (empty, or holding pages 0-7 as a previous round) and the frame's page limit; the rest is
//! the frame. Whatever it writes must carry the checksum the frame gave for it, so nothing it
//! writes can be other than what was sent; a second pass reaches past the page list's checksum.
#![no_main]

use std::collections::HashMap;

use dataplane::hde::{self, PAGE, PageStore};
use libfuzzer_sys::fuzz_target;

#[derive(Default)]
struct Store {
    now: HashMap<u64, Vec<u8>>,
    base: HashMap<u64, Vec<u8>>,
    owned: u64,
}

impl PageStore for Store {
    fn get(&self, no: u64) -> Option<&[u8]> {
        self.now.get(&no).or_else(|| self.base.get(&no)).map(Vec::as_slice)
    }
    fn base(&self, no: u64) -> Option<&[u8]> {
        self.base.get(&no).map(Vec::as_slice)
    }
    fn put(&mut self, no: u64, page: &[u8]) {
        assert!(no < self.owned, "a page outside the chunk was written");
        assert_eq!(page.len(), PAGE);
        self.now.insert(no, page.to_vec());
    }
    fn owns(&self, no: u64) -> bool {
        no < self.owned
    }
}

fn run(sel: u8, frame: &[u8]) {
    let mut s = Store { owned: 64, ..Store::default() };
    if sel & 1 == 1 {
        for k in 0..8u64 {
            s.base.insert(k, vec![k as u8; PAGE]);
        }
    }
    let limit = if sel & 2 == 0 { 64 } else { 1 << 18 };
    // One decoder for every input (it keeps no state between frames), as a receiver's stream does.
    thread_local!(static DEC: std::cell::RefCell<hde::Decoder> = std::cell::RefCell::new(hde::Decoder::new(None).expect("decoder")));
    DEC.with_borrow_mut(|d| {
        if let Ok(r) = d.decode_bounded(frame, &mut s, limit) {
            assert!(r.rejected.len() + r.deferred.len() + r.applied as usize <= limit);
            let _ = hde::Decoder::retry(&r.deferred, &mut s);
        }
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else { return };
    run(sel, rest);
    // Past the page list's checksum: the next two bytes say where the list ends, and its
    // checksum goes there, so the entries and blocks behind it are reached.
    if rest.len() >= 2 {
        let at = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (list, blocks) = rest[2..].split_at(at);
        let mut frame = list.to_vec();
        frame.extend_from_slice(&hde::list_sum(list).to_le_bytes());
        frame.extend_from_slice(blocks);
        run(sel, &frame);
    }
});
