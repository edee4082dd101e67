// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
// dwcp's TCP probes: per-socket path state of dwcp's own sockets, read from inside the kernel.
//
// Three tracepoints, filtered by socket cookie (the `watch` map, filled by user space with the
// SO_COOKIE of each stream it opens; every other socket costs one hash lookup):
//   tcp:tcp_probe            each segment a watched socket receives (so each ACK on a sender):
//                            srtt, min RTT, cwnd, ssthresh, windows, delivered, delivery rate
//   tcp:tcp_retransmit_skb   each retransmitted segment
//   tcp:tcp_cong_state_set   each congestion-state change (Open, Disorder, CWR, Recovery, Loss)
// State goes to the per-socket `stats` map; retransmits and state changes also go to the `events`
// ring buffer, which user space drains at a fixed cadence. The programs are BTF-typed raw
// tracepoints (tp_btf): they get the kernel's own arguments (the socket), attach by name without
// tracefs, and read tcp_sock fields through CO-RE relocations against the running kernel's BTF.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "tcpstats.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, __u64);
    __type(value, __u8);
} watch SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, __u64);
    __type(value, struct sock_stats);
} stats SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, 256 * 1024);
} events SEC(".maps");

static __always_inline __u64 cookie_of(const struct sock *sk)
{
    return BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
}

static __always_inline struct sock_stats *entry(__u64 cookie)
{
    if (!bpf_map_lookup_elem(&watch, &cookie))
        return 0;
    struct sock_stats *s = bpf_map_lookup_elem(&stats, &cookie);
    if (s)
        return s;
    struct sock_stats zero = {};
    bpf_map_update_elem(&stats, &cookie, &zero, BPF_NOEXIST);
    return bpf_map_lookup_elem(&stats, &cookie);
}

static __always_inline void emit(__u64 cookie, __u32 kind, __u32 value)
{
    struct probe_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
    if (!e)
        return;
    e->ts_ns = bpf_ktime_get_ns();
    e->cookie = cookie;
    e->kind = kind;
    e->value = value;
    bpf_ringbuf_submit(e, 0);
}

SEC("tp_btf/tcp_probe")
int BPF_PROG(on_tcp_probe, struct sock *sk, struct sk_buff *skb)
{
    __u64 cookie = cookie_of(sk);
    struct sock_stats *s = entry(cookie);
    if (!s)
        return 0;
    const struct tcp_sock *tp = (const struct tcp_sock *)sk;
    s->updated_ns = bpf_ktime_get_ns();
    s->events += 1;
    s->srtt_us = BPF_CORE_READ(tp, srtt_us) >> 3;
    s->min_rtt_us = BPF_CORE_READ(tp, rtt_min.s[0].v);
    s->cwnd = BPF_CORE_READ(tp, snd_cwnd);
    s->ssthresh = BPF_CORE_READ(tp, snd_ssthresh);
    s->snd_wnd = BPF_CORE_READ(tp, snd_wnd);
    s->rcv_wnd = BPF_CORE_READ(tp, rcv_wnd);
    s->mss = BPF_CORE_READ(tp, mss_cache);
    s->total_retrans = BPF_CORE_READ(tp, total_retrans);
    s->delivered = BPF_CORE_READ(tp, delivered);
    s->bytes_acked = BPF_CORE_READ(tp, bytes_acked);
    // The last rate sample, as tcp_get_info reports it: segments delivered over the interval.
    __u32 interval = BPF_CORE_READ(tp, rate_interval_us);
    __u32 rate_delivered = BPF_CORE_READ(tp, rate_delivered);
    if (interval > 0)
        s->delivery_rate_bps = (__u64)rate_delivered * s->mss * 1000000ull / interval;
    return 0;
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(on_retransmit, const struct sock *sk, const struct sk_buff *skb)
{
    __u64 cookie = cookie_of(sk);
    struct sock_stats *s = entry(cookie);
    if (!s)
        return 0;
    s->retrans_events += 1;
    emit(cookie, EVENT_RETRANSMIT, BPF_CORE_READ(sk, __sk_common.skc_state));
    return 0;
}

SEC("tp_btf/tcp_cong_state_set")
int BPF_PROG(on_cong_state, struct sock *sk, const __u8 ca_state)
{
    __u64 cookie = cookie_of(sk);
    struct sock_stats *s = entry(cookie);
    if (!s)
        return 0;
    s->cong_state = ca_state;
    if (ca_state >= 3) // TCP_CA_Recovery, TCP_CA_Loss
        s->recoveries += 1;
    emit(cookie, EVENT_CONG_STATE, ca_state);
    return 0;
}
