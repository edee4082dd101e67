//! Fuzzes the source side's parser of QEMU's migration stream (bytes from QEMU, which a guest
//! influences): fed in pieces, it must not panic, and whatever it encodes must decode back to
//! exactly the bytes it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, rest)) = data.split_first() else { return };
    let Ok(mut e) = dataplane::qemu::Encoder::new(None, 1 << 20) else { return };
    let mut enc = Vec::new();
    for p in rest.chunks(usize::from(piece).max(1) * 64) {
        e.push(p);
        enc.extend(e.take());
    }
    e.finish();
    enc.extend(e.take());
    let mut d = dataplane::qemu::Decoder::with_ram_limit(1 << 30).expect("decoder");
    let mut out = Vec::new();
    d.push(&enc, &mut out).expect("the decoder takes what the encoder made");
    assert!(d.finish().is_ok());
    assert_eq!(out, rest, "the stream round-trips");
});
