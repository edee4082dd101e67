//! All `unsafe` of the rigs: verbs calls for the RDMA smoke test, TUN and namespace calls for the
//! WAN emulator. Each block carries a `// SAFETY:` line.

pub mod rdma;
pub mod tun;
