//! eBPF TCP probes (not built yet; issue "eBPF TCP probes feeding ACP"). It will hold the BPF
//! programs in C (tracepoints `tcp:tcp_probe`, `tcp:tcp_retransmit_skb`, `tcp:tcp_cong_state_set`)
//! compiled with libbpf-cargo, their loader on libbpf-rs filtering dwcp's own sockets, and the
//! `TCP_INFO` polling fallback for hosts without BPF permission.
