//! Fuzzes the page-aware QEMU stream decoder (a migration destination's `dwcp recv --out -`):
//! fed in pieces of the size the first byte gives, under a 64 MiB RAM limit. It must not
//! panic, and every byte it releases is covered by a batch or record checksum. One decoder
//! serves every input, restarted between them, as a receiver's would across sessions.
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;

thread_local! {
    static DEC: RefCell<dataplane::qemu::Decoder> = RefCell::new(dataplane::qemu::Decoder::with_ram_limit(64 << 20).expect("decoder"));
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, rest)) = data.split_first() else { return };
    DEC.with_borrow_mut(|d| {
        d.restart();
        let mut out = Vec::new();
        for p in rest.chunks(usize::from(piece).max(1) * 64) {
            if d.push(p, &mut out).is_err() {
                return;
            }
        }
        assert_eq!(out.len() as u64, d.report().output);
        let _ = d.finish();
    });
});
