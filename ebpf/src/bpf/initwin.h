// Shared between initwin.bpf.c and user space (ebpf/src/sys.rs writes and reads the bytes).
#ifndef DWCP_INITWIN_H
#define DWCP_INITWIN_H

// A peer: family (AF_INET or AF_INET6), address as the socket holds it (network byte order;
// IPv4 in addr[0]), port in host byte order.
struct iw_key {
    __u32 family;
    __u32 addr[4];
    __u32 port;
};

struct iw_value {
    __u32 bytes;    // the window to give, bytes (set by user space)
    __u32 segments; // what the last connection got, segments
    __u32 applied;  // connections given it
    __u32 refused;  // connections where the kernel refused it
    // The startup window (set by user space): in flight at most gain16 / 16 times what the
    // stream delivers per least RTT, until user space releases the stream; 0: no clamp.
    __u32 gain16;
    __u32 clamped;   // streams clamped
    __u32 released;  // streams released (by user space, a missing peer, or an implausible RTT)
    __u32 peak_segs; // the largest clamp set, segments
};

// Per stream (socket local storage): what the startup window holds for it.
struct sw_state {
    __u64 max_rate_pps; // the most packets per second one delivery-rate sample read
    __u32 clamp;        // the clamp now set, segments (0: none)
    __u32 floor;        // the least clamp: the window when it was armed, segments
    __u32 gain16;       // copied from the peer's entry when the stream connected
    __u32 release;      // set by user space (or the program): lift the clamp at the next ACK
    __u32 first_rtt_us; // the smoothed RTT when the connection was established (its handshake's)
    __u32 armed;        // clamping (after its first two windows were acknowledged)
};

#endif
