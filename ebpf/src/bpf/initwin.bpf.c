// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
// dwcp's first window and startup window: a sockops program that gives the streams dwcp opens
// to a peer a larger first window than TCP's ten segments, and holds what they have in flight
// during startup to a multiple of what they deliver.
//
// First window. On a long path the first round trips decide how soon a transfer reaches the
// link's rate: from ten segments per stream, slow start (or BBR's startup) needs about
// log2(BDP / 10 segments) round trips, half of them at under a quarter of the rate. No receiver
// advertises more than 64 KiB before its first scaled window, so that much is what the first
// round trip can carry anyway; ten segments use a fifth of it.
//
// User space puts the peer (address, port) and a window in bytes into `initial_window` before
// it connects; when a connection to that peer becomes established, the program sets
// TCP_BPF_IW to that many bytes in segments of the connection's MSS (at least ten) before the
// congestion control initialises (BBR sizes its first pacing rate from it). Every other socket
// costs one hash lookup at connection time and nothing after.
//
// Startup window. BBR's startup paces at 2.89x its bandwidth estimate with a window of 2.89x
// its BDP estimate; once the link is full it holds about 2.9 BDP in flight for the three round
// trips it takes to see that the rate stopped growing, and a queue of one BDP drops the
// excess: one burst of loss per stream, thousands of retransmits, at the moment the link
// fills. No decision taken a round trip later can prevent it (the queue overflows half a round
// trip after the link fills). So while the entry's gain16 is set, each stream's window is
// clamped (TCP_BPF_SNDCWND_CLAMP) on every RTT sample to gain16 / 16 times the most it has
// delivered per least RTT: startup still grows by that factor per round trip, and once the
// link is full at most (gain - 1) BDP stands in the queue. User space lifts the clamp when ACP
// leaves startup (it paces from then on) by setting `release` in the stream's storage; the
// program lifts it itself when the peer's entry is gone, or when the kernel's least RTT is
// under a quarter of the handshake's RTT (a reordering path's implausible minimum, which would
// clamp the window to nothing), and then stops asking for RTT callbacks.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "initwin.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define SOL_TCP 6
#define TCP_BPF_IW 1001
#define TCP_BPF_SNDCWND_CLAMP 1002
#define NO_CLAMP 0x7fffffff
#define AF_INET 2
#define AF_INET6 10

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 256);
    __type(key, struct iw_key);
    __type(value, struct iw_value);
} initial_window SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_SK_STORAGE);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __type(key, int);
    __type(value, struct sw_state);
} startup_window SEC(".maps");

static __always_inline void peer_key(struct bpf_sock_ops *skops, struct iw_key *k)
{
    k->family = skops->family;
    if (skops->family == AF_INET) {
        k->addr[0] = skops->remote_ip4;
    } else {
        k->addr[0] = skops->remote_ip6[0];
        k->addr[1] = skops->remote_ip6[1];
        k->addr[2] = skops->remote_ip6[2];
        k->addr[3] = skops->remote_ip6[3];
    }
    k->port = bpf_ntohl(skops->remote_port);
}

static __always_inline int established(struct bpf_sock_ops *skops)
{
    struct iw_key k = {};
    peer_key(skops, &k);
    struct iw_value *v = bpf_map_lookup_elem(&initial_window, &k);
    if (!v)
        return 1;
    __u32 mss = skops->mss_cache;
    int segs = mss ? v->bytes / mss : 0;
    if (segs < 10)
        segs = 10;
    if (bpf_setsockopt(skops, SOL_TCP, TCP_BPF_IW, &segs, sizeof(segs)) == 0)
        __sync_fetch_and_add(&v->applied, 1);
    else
        __sync_fetch_and_add(&v->refused, 1);
    v->segments = segs;
    __u32 gain16 = v->gain16;
    if (!gain16)
        return 1;
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return 1;
    struct sw_state *st = bpf_sk_storage_get(&startup_window, sk, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!st)
        return 1;
    st->max_rate_pps = 0;
    st->clamp = 0;
    st->floor = segs;
    st->gain16 = gain16;
    st->release = 0;
    st->first_rtt_us = skops->srtt_us >> 3;
    st->armed = 0;
    bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_RTT_CB_FLAG);
    return 1;
}

// Lifts the clamp (if one was set) and stops the RTT callbacks.
static __always_inline void release(struct bpf_sock_ops *skops, struct sw_state *st, struct iw_value *v)
{
    if (st->clamp) {
        int val = NO_CLAMP;
        bpf_setsockopt(skops, SOL_TCP, TCP_BPF_SNDCWND_CLAMP, &val, sizeof(val));
        st->clamp = 0;
    }
    st->release = 2;
    if (v)
        __sync_fetch_and_add(&v->released, 1);
    bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_RTT_CB_FLAG);
}

static __always_inline int rtt_sample(struct bpf_sock_ops *skops)
{
    struct bpf_sock *sk = skops->sk;
    if (!sk)
        return 1;
    struct sw_state *st = bpf_sk_storage_get(&startup_window, sk, 0, 0);
    struct iw_key k = {};
    peer_key(skops, &k);
    struct iw_value *v = bpf_map_lookup_elem(&initial_window, &k);
    if (!st) {
        bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_RTT_CB_FLAG);
        return 1;
    }
    if (st->release == 2)
        return 1;
    __u32 rtt_min = skops->rtt_min;
    // Released by user space, the send gone, or a least RTT too small to believe: under a
    // quarter of the handshake's (judged against that, not the smoothed RTT, which the queue
    // startup builds inflates) on a path of a millisecond or more (below, a host's own
    // scheduling moves RTTs by that much).
    if (st->release || !v || (st->first_rtt_us >= 1000 && rtt_min && (__u64)rtt_min * 4 < st->first_rtt_us)) {
        release(skops, st, v);
        return 1;
    }
    __u32 interval = skops->rate_interval_us;
    __u32 delivered = skops->rate_delivered;
    if (interval && delivered) {
        __u64 pps = (__u64)delivered * 1000000 / interval;
        if (pps > st->max_rate_pps)
            st->max_rate_pps = pps;
    }
    if (!rtt_min)
        return 1;
    // Armed once two first windows are acknowledged: before, the stream's rate samples measure
    // its handshake and first flight, which its window limited, and would clamp it below what
    // startup has already reached (the first round trips cannot overflow anything).
    if (!st->armed) {
        if (skops->bytes_acked < (__u64)st->floor * skops->mss_cache * 2)
            return 1;
        st->armed = 1;
        if (skops->snd_cwnd > st->floor)
            st->floor = skops->snd_cwnd;
    }
    __u64 want = st->max_rate_pps * rtt_min / 1000000 * st->gain16 / 16;
    if (want < st->floor)
        want = st->floor;
    if (want > NO_CLAMP - 1)
        want = NO_CLAMP - 1;
    // Only upwards: a clamp is never tightened below what the stream was allowed.
    if (want <= st->clamp)
        return 1;
    int val = want;
    if (bpf_setsockopt(skops, SOL_TCP, TCP_BPF_SNDCWND_CLAMP, &val, sizeof(val)) != 0)
        return 1;
    if (!st->clamp)
        __sync_fetch_and_add(&v->clamped, 1);
    st->clamp = want;
    if (want > v->peak_segs)
        v->peak_segs = want;
    return 1;
}

SEC("sockops")
int set_initial_window(struct bpf_sock_ops *skops)
{
    if (skops->family != AF_INET && skops->family != AF_INET6)
        return 1;
    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        return established(skops);
    if (skops->op == BPF_SOCK_OPS_RTT_CB)
        return rtt_sample(skops);
    return 1;
}
