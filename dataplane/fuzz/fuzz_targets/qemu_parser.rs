//! Fuzzes the source side's parser of QEMU's migration stream (bytes from QEMU, which a guest
//! influences): fed in pieces, it must not panic, and whatever it encodes must decode back to
//! exactly the bytes it was given. One encoder and decoder serve every input, restarted
//! between them (a new pair per input spent its time building zstd tables: 190 inputs/s).
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;

thread_local! {
    static CODERS: RefCell<(dataplane::qemu::Encoder, dataplane::qemu::Decoder)> = RefCell::new((
        dataplane::qemu::Encoder::new(None, 1 << 20).expect("encoder"),
        dataplane::qemu::Decoder::with_ram_limit(1 << 30).expect("decoder"),
    ));
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, rest)) = data.split_first() else { return };
    CODERS.with_borrow_mut(|(e, d)| {
        e.restart();
        d.restart();
        let mut enc = Vec::new();
        for p in rest.chunks(usize::from(piece).max(1) * 64) {
            e.push(p);
            enc.extend(e.take());
        }
        e.finish();
        enc.extend(e.take());
        let mut out = Vec::new();
        d.push(&enc, &mut out).expect("the decoder takes what the encoder made");
        assert!(d.finish().is_ok());
        assert_eq!(out, rest, "the stream round-trips");
    });
});
