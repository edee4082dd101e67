//! Fuzzes what a gossip peer's packet reaches once its seal has verified (a careless or buggy
//! member, not a stranger): foca's decoder and the card decoder behind it. No panic; the node
//! keeps working after any input.
#![no_main]

use std::time::Instant;

use ctlplane::gossip::{Card, Gossip, Id, config};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|b: &[u8]| {
    let _ = Card::decode(b);
    let now = Instant::now();
    let mut g = Gossip::new(Id { addr: "10.0.0.1:7473".parse().unwrap(), node: 1, bump: 0 }, config(4, std::time::Duration::from_secs(1)), 1);
    let _ = g.handle(b, now);
    let _ = g.tick(now + std::time::Duration::from_secs(10));
    let _ = g.view(now);
});
