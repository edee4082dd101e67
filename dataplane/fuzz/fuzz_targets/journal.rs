//! Fuzzes the resume journal's parser (a file a crash, a full disk or another process may have
//! cut or changed): no panic, and every record it returns is whole.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|b: &[u8]| {
    if let Some((_, recs)) = dataplane::session::parse_journal(b) {
        assert!(recs.len() * 24 <= b.len());
    }
});
