//! What the benchmark binaries share: the failure exit, a child process killed when dropped, and
//! commands run inside the WAN rig's network namespaces.

use std::process::{Child, Command};

/// Prints `BENCH: msg` (the binary's name) and exits with status 2.
pub fn die(msg: &str) -> ! {
    let name = std::env::args().next().and_then(|a| std::path::Path::new(&a).file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| "bench".into());
    eprintln!("{name}: {msg}");
    std::process::exit(2);
}

/// A child process, killed and reaped when dropped.
#[derive(Debug)]
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ip netns exec NS PROG`: add the program's arguments to the result.
pub fn in_ns(ns: &str, prog: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(prog);
    c
}
