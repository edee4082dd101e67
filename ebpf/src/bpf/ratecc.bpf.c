// SPDX-License-Identifier: GPL-2.0
// dwcp's rate congestion control: a TCP congestion control (BPF struct_ops) whose window follows
// the pace ACP sets on the socket (SO_MAX_PACING_RATE), for paths where the kernel's own
// algorithms cannot work.
//
// BBR sizes its window as two of its bandwidth estimate times its least RTT sample. A path that
// delivers a few packets far sooner than the rest (netem-style reordering, where a reordered
// packet skips the delay; some multipath and satellite links) hands BBR an RTT sample of a
// fraction of the real one: at 50 ms with 1% reordering, samples of 0.1-4 ms. BBR's window then
// holds a few dozen segments, its bandwidth estimate falls with what that window lets through,
// and the transfer collapses to a few percent of the link (measured on the WAN rig: 0.04-0.08 of
// 1 Gbit/s). Cubic, on the same path, is held to the Mathis rate of its loss.
//
// This algorithm has neither weakness. While ACP paces the socket, the window is two of that
// pace times the smoothed RTT (an average, so a rare early packet barely moves it) plus four
// segments, and the kernel paces at ACP's rate: how fast to send is ACP's decision, taken from
// delivery and queue delay, and the window only keeps the pacer the limit. Loss does not shrink
// it (ACP answers a queue by pacing lower). While no pace is set (the moment between switching
// to it and ACP's next decision), it grows like slow start and backs off by 30% on a loss, so it
// is never a blind flood.
//
// The program is registered under a name of its loader's choosing (one per process, so two
// senders on a host do not collide); sockets select it with TCP_CONGESTION.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define SK_PACING_NEEDED 1
#define TCP_INFINITE_SSTHRESH 0x7fffffff
#define USEC_PER_SEC 1000000ULL
#define UNPACED (~0UL)
/* The window as a multiple of pace x RTT. */
#define CWND_GAIN 2
/* Pacing while unpaced, percent of window / RTT (the kernel's slow-start ratio). */
#define UNPACED_PACING_PCT 200

static __always_inline struct tcp_sock *tcp_sk(struct sock *sk)
{
    return (struct tcp_sock *)sk;
}

SEC("struct_ops")
void BPF_PROG(dwcp_rate_init, struct sock *sk)
{
    // The kernel paces the socket itself (no fq qdisc needed), at sk_pacing_rate capped by
    // SO_MAX_PACING_RATE.
    sk->sk_pacing_status = SK_PACING_NEEDED;
    tcp_sk(sk)->snd_ssthresh = TCP_INFINITE_SSTHRESH;
}

SEC("struct_ops")
void BPF_PROG(dwcp_rate_cong_control, struct sock *sk, u32 ack, int flag, const struct rate_sample *rs)
{
    struct tcp_sock *tp = tcp_sk(sk);
    u64 srtt = tp->srtt_us >> 3;
    u64 mss = tp->mss_cache;
    u64 max = sk->sk_max_pacing_rate;
    u64 cwnd;

    if (!srtt || !mss)
        return;
    if (max && max != UNPACED) {
        cwnd = max * srtt * CWND_GAIN / USEC_PER_SEC / mss + 4;
        sk->sk_pacing_rate = max;
    } else {
        cwnd = tp->snd_cwnd;
        if (rs->losses > 0)
            cwnd = cwnd * 7 / 10;
        else
            cwnd += rs->acked_sacked;
        if (cwnd < 4)
            cwnd = 4;
        sk->sk_pacing_rate = cwnd * mss * USEC_PER_SEC * UNPACED_PACING_PCT / 100 / srtt;
    }
    if (cwnd > tp->snd_cwnd_clamp)
        cwnd = tp->snd_cwnd_clamp;
    tp->snd_cwnd = cwnd;
}

SEC("struct_ops")
u32 BPF_PROG(dwcp_rate_ssthresh, struct sock *sk)
{
    // No multiplicative decrease: the window is set from the pace on every acknowledgement.
    return TCP_INFINITE_SSTHRESH;
}

SEC("struct_ops")
u32 BPF_PROG(dwcp_rate_undo_cwnd, struct sock *sk)
{
    return tcp_sk(sk)->snd_cwnd;
}

SEC(".struct_ops.link")
struct tcp_congestion_ops dwcp_rate = {
    .init = (void *)dwcp_rate_init,
    .cong_control = (void *)dwcp_rate_cong_control,
    .ssthresh = (void *)dwcp_rate_ssthresh,
    .undo_cwnd = (void *)dwcp_rate_undo_cwnd,
    .name = "dwcp_rate",
};
