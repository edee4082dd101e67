//! Rigs that behave like the real world, for tests and benches this host cannot run natively.
//!
//! - `hw-tests/vm`: the soft-RoCE guest. Debian's 6.1 kernel (rdma_rxe, sch_netem) under QEMU
//!   software emulation, host root over 9p with a tmpfs overlay, `rxe0` up; runs a command.
//! - `rdma-smoke`: verbs smoke test (RDMA WRITE WITH IMMEDIATE and SEND/RECV between two RC QPs)
//!   through dwcp's verbs layer, built on the host, run in the guest.
//!
//! - [`link`]: the WAN link model (loss, drop-tail queue, rate, delay, jitter, reordering) that
//!   `dwcp-wan` runs between TUN devices in two network namespaces (`hw-tests/wan`).
//!
//! - `hw-tests/corpus`: the guest-RAM corpus (two snapshots of a busy guest's memory).

pub mod link;
pub mod sys;

use std::path::PathBuf;
use std::process::Command;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_owned()
}

/// Runs `sh -c script` in a fresh soft-RoCE guest of `mem_mib`; returns (status, stdout+stderr).
pub fn in_guest(script: &str, mem_mib: u32, timeout_s: u32) -> (i32, String) {
    let out = Command::new(root().join("hw-tests/vm"))
        .args(["run", "--mem", &mem_mib.to_string(), "--timeout", &timeout_s.to_string(), "--", "sh", "-c", script])
        .current_dir(root())
        .output()
        .expect("run hw-tests/vm");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}
