// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
// dwcp's initial congestion window: a sockops program that gives the streams dwcp opens to a
// peer a larger first window than TCP's ten segments.
//
// On a long path the first round trips decide how soon a transfer reaches the link's rate: from
// ten segments per stream, slow start (or BBR's startup) needs about log2(BDP / 10 segments)
// round trips, half of them at under a quarter of the rate. No receiver advertises more than
// 64 KiB before its first scaled window, so that much is what the first round trip can carry
// anyway; ten segments use a fifth of it.
//
// User space puts the peer (address, port) and a window in bytes into `initial_window` before
// it connects; when a connection to that peer becomes established, the program sets
// TCP_BPF_IW to that many bytes in segments of the connection's MSS (at least ten) before the
// congestion control initialises (BBR sizes its first pacing rate from it). Every other socket
// costs one hash lookup at connection time and nothing after.
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "initwin.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define SOL_TCP 6
#define TCP_BPF_IW 1001
#define AF_INET 2
#define AF_INET6 10

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 256);
    __type(key, struct iw_key);
    __type(value, struct iw_value);
} initial_window SEC(".maps");

SEC("sockops")
int set_initial_window(struct bpf_sock_ops *skops)
{
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
        return 1;
    struct iw_key k = {};
    k.family = skops->family;
    if (skops->family == AF_INET) {
        k.addr[0] = skops->remote_ip4;
    } else if (skops->family == AF_INET6) {
        k.addr[0] = skops->remote_ip6[0];
        k.addr[1] = skops->remote_ip6[1];
        k.addr[2] = skops->remote_ip6[2];
        k.addr[3] = skops->remote_ip6[3];
    } else {
        return 1;
    }
    k.port = bpf_ntohl(skops->remote_port);
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
    return 1;
}
