// Shared between the BPF programs and user space (ebpf/src/probes.rs mirrors it as repr(C)).
#ifndef DWCP_TCPSTATS_H
#define DWCP_TCPSTATS_H

struct sock_stats {
    __u64 updated_ns;
    __u64 events;
    __u64 delivered;
    __u64 bytes_acked;
    __u64 delivery_rate_bps;
    __u64 retrans_events;
    __u64 recoveries;
    __u32 srtt_us;
    __u32 min_rtt_us;
    __u32 cwnd;
    __u32 ssthresh;
    __u32 snd_wnd;
    __u32 rcv_wnd;
    __u32 mss;
    __u32 total_retrans;
    __u8 cong_state;
    __u8 pad[7];
};

enum { EVENT_RETRANSMIT = 1, EVENT_CONG_STATE = 2 };

struct probe_event {
    __u64 ts_ns;
    __u64 cookie;
    __u32 kind;
    __u32 value;
};

#endif
