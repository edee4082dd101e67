//! All `unsafe` of the rigs: TUN and namespace calls for the WAN emulator. Each block carries a
//! `// SAFETY:` line. (The RDMA smoke test uses dwcp's own verbs layer.)

pub mod tun;
