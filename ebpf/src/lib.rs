//! eBPF TCP probes. Built so far: the permission probe ([`sys::probe_bpf`]) that host detection
//! uses. Still to come (eBPF issue): BPF programs in C on `tcp:tcp_probe`,
//! `tcp:tcp_retransmit_skb` and `tcp:tcp_cong_state_set` compiled with libbpf-cargo, their
//! loader on libbpf-rs filtering dwcp's own sockets, and the `TCP_INFO` polling fallback.

pub mod sys;
