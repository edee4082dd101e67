//! Fuzzes the daemon's configuration parser and validation (a file an operator may get wrong):
//! no panic, and a configuration that validates yields thresholds without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|b: &[u8]| {
    let Ok(s) = std::str::from_utf8(b) else { return };
    if let Ok(c) = ctlplane::config::Config::parse(s, "fuzz.toml") {
        let _ = c.thresholds();
    }
});
