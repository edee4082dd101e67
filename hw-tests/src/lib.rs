//! Rigs that behave like the real world, for tests and benches this host cannot run natively.
//!
//! - `hw-tests/vm`: the soft-RoCE guest. Debian's 6.1 kernel (rdma_rxe, sch_netem) under QEMU
//!   software emulation, host root over 9p with a tmpfs overlay, `rxe0` up; runs a command.
//! - [`sys::rdma::loopback_smoke`]: verbs smoke test (RDMA WRITE and SEND/RECV between two RC QPs),
//!   built on the host, run in the guest by the `rdma-smoke` binary.
//!
//! - [`link`]: the WAN link model (loss, drop-tail queue, rate, delay, jitter, reordering) that
//!   `dwcp-wan` runs between TUN devices in two network namespaces (`hw-tests/wan`).
//!
//! Still to come (rigs issue): the guest-RAM corpus.

pub mod sys;
pub mod link;
