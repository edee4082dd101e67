//! Fuzzes the incremental frame reader over both codecs (plaintext, and AES-GCM under keys from a
//! real handshake), with the input cut into two pushes where its first byte says. None may panic,
//! and a frame it yields must hold the bytes its header declares.
#![no_main]

use std::sync::OnceLock;

use dataplane::crypto::{FrameCodec, Initiator, Psk, Responder, SessionKeys};
use dataplane::framing::FrameReader;
use libfuzzer_sys::fuzz_target;

fn keys() -> &'static SessionKeys {
    static K: OnceLock<SessionKeys> = OnceLock::new();
    K.get_or_init(|| {
        let psk = Psk::from_hex(&"5a".repeat(32)).expect("hex");
        let (_, msg1) = Initiator::start(&psk).expect("start");
        Responder::accept(&psk, &msg1).expect("accept").1
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else { return };
    for mut codec in [FrameCodec::new(0, None), FrameCodec::new(0, Some(keys()))] {
        let mut r = FrameReader::default();
        let split = (cut as usize).min(rest.len());
        for piece in [&rest[..split], &rest[split..]] {
            r.push(piece);
            while let Ok(Some((h, p))) = r.next_frame(&mut codec) {
                assert_eq!(h.len as usize, p.len());
            }
        }
    }
});
