//! Fuzzes the fleet's request and reply decoders (bytes another daemon sends after the
//! handshake): no panic; a request that decodes re-encodes, and its command, applied to a
//! state, is either applied or refused without panicking.
#![no_main]

use ctlplane::fleet::net::{Request, decode_reply, decode_request};
use ctlplane::fleet::state::FleetState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|b: &[u8]| {
    let _ = decode_reply(b);
    let Ok(env) = decode_request(b) else { return };
    let _ = serde_json::to_vec(&env).expect("a decoded request re-encodes");
    let mut s = FleetState::default();
    match env.req {
        Request::Write(cmd) => {
            let _ = s.apply(&cmd);
        }
        Request::Append(a) => {
            for e in a.entries {
                if let openraft::EntryPayload::Normal(cmd) = e.payload {
                    let _ = s.apply(&cmd);
                }
            }
        }
        _ => {}
    }
});
