//! Fuzzes every decoder of a control payload or fixed header a peer sends (preamble, frame
//! header, Hello, Welcome, Commit, Ack, Error, probe messages, RDMA setup), and the Noise
//! responder's first step. None may panic; what decodes must encode back to a value that
//! decodes to the same thing.
#![no_main]

use dataplane::crypto::{Psk, Responder};
use dataplane::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|b: &[u8]| {
    if let Ok(h) = wire::Hello::decode(b) {
        assert_eq!(wire::Hello::decode(&h.encode()).as_ref(), Ok(&h));
    }
    if let Ok(w) = wire::Welcome::decode(b) {
        assert_eq!(wire::Welcome::decode(&w.encode()).map(|x| x.session), Ok(w.session));
    }
    let _ = wire::Commit::decode(b);
    if let Ok(a) = wire::decode_ack(b) {
        assert!(a.len() <= b.len() / 8);
    }
    if let Ok((_, msg)) = wire::decode_error(b) {
        assert!(!msg.chars().any(char::is_control), "control characters reach a terminal");
    }
    let _ = wire::ProbeMsg::decode(b);
    let _ = wire::RdmaConnect::decode(b);
    let _ = wire::RdmaAccept::decode(b);
    let _ = wire::RdmaCredit::decode(b);
    if let Some(p) = b.get(..wire::PREAMBLE_LEN) {
        let _ = wire::Preamble::decode(p.try_into().expect("len"));
    }
    if let Some(h) = b.get(..wire::HEADER_LEN) {
        let _ = wire::FrameHeader::decode(h.try_into().expect("len"));
    }
    // The Noise responder costs a key agreement per input: run on one input in 16 (those whose
    // last byte is a multiple of 16), so the cheap decoders above get the executions.
    if b.last().is_some_and(|x| x % 16 == 0) {
        let psk = Psk::from_hex(&"5a".repeat(32)).expect("hex");
        let _ = Responder::accept(&psk, b);
    }
});
