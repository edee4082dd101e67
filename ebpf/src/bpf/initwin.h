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
};

#endif
