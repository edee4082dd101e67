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

impl Proc {
    /// Spawns `c` as the leader of a new process group, so dropping it also ends what it
    /// started (QEMU's `exec:` migration helpers outlive QEMU otherwise).
    pub fn group(c: &mut Command) -> std::io::Result<Proc> {
        use std::os::unix::process::CommandExt;
        c.process_group(0).spawn().map(Proc)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // The group first (fails harmlessly when this is not a group leader).
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0.id())]).stderr(std::process::Stdio::null()).status();
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
